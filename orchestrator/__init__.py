"""Tightwad's cluster manager: places and hot-swaps models across Docker hosts."""

"""Typed access to the pinned libllama through llama-cpp-python's ctypes bindings.

Only what the verifier needs: load a model (optionally pooling RPC devices),
tokenize and detokenize, create independent contexts and decode batches with
logits requested per position. The bindings are imported lazily, after
``LLAMA_CPP_LIB_PATH`` points at the pinned build, so that the verifier runs
exactly the llama.cpp that ``images/llama.cpp/build.sh`` produced.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np

_LOG_CALLBACK = None  # keeps the ctypes callback alive; written once at import of the bindings


def load_bindings(lib_dir: str | None, *, verbose: bool = False) -> ModuleType:
    """Import llama_cpp against ``lib_dir`` (the pinned build's bin directory)."""
    global _LOG_CALLBACK
    if lib_dir:
        if not os.path.exists(os.path.join(lib_dir, "libllama.so")):
            raise FileNotFoundError(f"no libllama.so in {lib_dir}")
        os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    import llama_cpp

    if _LOG_CALLBACK is None:
        # llama.cpp logs every tensor at load; keep stderr readable unless asked.
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user: None)
        if not verbose:
            llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def add_rpc_servers(lib_dir: str, servers: Sequence[str]) -> None:
    """Register llama.cpp RPC servers as devices, as ``llama-server --rpc`` does."""
    ggml = ctypes.CDLL(os.path.join(lib_dir, "libggml.so"))
    base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    ggml.ggml_backend_load_all()
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RuntimeError("this llama.cpp build has no RPC backend (build with -DGGML_RPC=ON)")
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    fn_ptr = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not fn_ptr:
        raise RuntimeError("this llama.cpp build lacks ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(fn_ptr)
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    for server in servers:
        server_reg = add_server(server.encode())
        if not server_reg:
            raise RuntimeError(f"could not connect to RPC server {server}")
        ggml.ggml_backend_register(server_reg)


class LlamaModel:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, lib: ModuleType, path: str, *, n_gpu_layers: int = 0):
        self._lib = lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self._model = lib.llama_model_load_from_file(path.encode(), params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load the model {path}")
        self.path = path
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = lib.llama_model_n_ctx_train(self._model)
        self.add_bos: bool = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.eog_tokens: frozenset[int] = frozenset(
            t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self._vocab, t)
        )
        self.bos_token_id: int = lib.llama_vocab_bos(self._vocab)
        self.eos_token_id: int = lib.llama_vocab_eos(self._vocab)
        # Recurrent state cannot be branched per position as a KV cache can.
        self.is_recurrent: bool = bool(
            lib.llama_model_is_recurrent(self._model) or lib.llama_model_is_hybrid(self._model)
        )

    @property
    def handle(self):  # noqa: ANN201 - a ctypes pointer
        return self._model

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 20)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        while True:
            out = (ctypes.c_int32 * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), out, cap, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            cap = -n

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        cap = max(64, 8 * len(tokens))
        while True:
            arr = (ctypes.c_int32 * len(tokens))(*tokens)
            buf = ctypes.create_string_buffer(cap)
            n = self._lib.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None


class LlamaContext:
    """One KV cache and its compute buffers; not thread-safe (callers serialise).

    Sequence 0 is the cache proper. With ``n_seq_max`` > 1 the cache is unified
    (one buffer of ``n_ctx`` cells shared by every sequence id, so that copying
    a prefix to another sequence is bookkeeping, not a copy), and further
    sequence ids may branch off sequence 0 for the length of one request.
    """

    def __init__(
        self, model: LlamaModel, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int,
        n_seq_max: int = 1,
    ):
        lib = model._lib
        self._lib = lib
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = model.n_vocab
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch
        params.n_seq_max = n_seq_max
        if n_seq_max > 1:
            # Not unified, llama.cpp would give each sequence n_ctx / n_seq_max cells.
            params.kv_unified = True
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(model.handle, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._mem = lib.llama_get_memory(self._ctx)
        self.n_seq_max = n_seq_max
        self._batch = lib.llama_batch_init(n_batch, 0, n_seq_max)

    def decode(self, tokens: Sequence[int], start_pos: int, outputs: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` at positions ``start_pos...`` of sequence 0 in ONE llama_decode call.

        Returns the logits rows for the batch indices in ``outputs`` (shape
        ``len(outputs) x n_vocab``, float32, copied out of llama.cpp's buffer).
        """
        n = len(tokens)
        return self.decode_seqs(tokens, range(start_pos, start_pos + n), [(0,)] * n, outputs)

    def decode_seqs(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[Sequence[int]],
        outputs: Sequence[int],
    ) -> np.ndarray:
        """ONE llama_decode of tokens that each carry a position and the sequence ids
        they belong to (a token shared by several sequences is stored once)."""
        n = len(tokens)
        assert 0 < n <= self.n_batch, (n, self.n_batch)
        batch = self._batch
        want = set(outputs)
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = positions[i]
            ids = seqs[i]
            assert 0 < len(ids) <= self.n_seq_max, ids
            batch.n_seq_id[i] = len(ids)
            for k, seq in enumerate(ids):
                batch.seq_id[i][k] = seq
            batch.logits[i] = i in want
        batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        rows = np.empty((len(outputs), self.n_vocab), dtype=np.float32)
        for j, i in enumerate(outputs):
            ptr = self._lib.llama_get_logits_ith(self._ctx, i)
            rows[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return rows

    def truncate(self, n_keep: int) -> None:
        """Drop every cached position >= n_keep (a rejected suffix, or all)."""
        self._lib.llama_memory_seq_rm(self._mem, 0, n_keep, -1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Drop sequence ``seq`` from positions [p0, p1) (-1: open ended); cells no
        other sequence holds become free."""
        self._lib.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Let ``dst`` share ``src``'s cells in [p0, p1): bookkeeping in a unified cache."""
        assert self.n_seq_max > 1
        self._lib.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None

"""Defaults of the runtime's settings that the operator also states (one source for both).

``config.RuntimeSettings`` uses them as its defaults; the operator's spec models (and so the CRD's
``default``) use them for ``spec.runtime``, and the builder passes them as flags. Plain constants: the
operator imports this module without torch or FastAPI.
"""

from typing import Literal, get_args

# Weight and activation dtypes the runtime loads (--dtype; the CRD's spec.model.dtype enum).
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
DTYPES: tuple[str, ...] = get_args(Dtype)

MAX_BATCH_SIZE = 32  # sequences decoded together in one step
MAX_QUEUE = 256  # requests waiting for a batch slot; more get 429
PORT = 8000  # the OpenAI-compatible API (and /metrics)

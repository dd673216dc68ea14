"""The recipes (one folder per stage) and what they share (`recipes/common`)."""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community"
# (an optional kernel fetched from the hub). That kernel only serves the packed layout `keep_4bit_weights_unpacked`
# turns off, so the notice says nothing about these runs; set here, in the top-level
# package every recipe and eval module imports before anything else (accelerate, transformers and trl import
# bitsandbytes early, through peft).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)

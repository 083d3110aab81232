"""flashinfer_py: run LLMs larger than DRAM by streaming sparse FFN neurons from flash."""
__version__ = "0.1.0"

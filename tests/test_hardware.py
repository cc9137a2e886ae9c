"""The machine description every benchmark and run header records."""

from jaxtune.hardware import cpu_model_and_flags, describe_cpu, vector_extensions

AVX512_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile
"""
AVX2_ONLY = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_vector_extensions_name_what_decides_matmul_speed():
    model, flags = cpu_model_and_flags(AVX512_AMX)
    assert model == "Intel(R) Xeon(R) Platinum 8480C"
    assert vector_extensions(flags) == ["AVX2", "AVX-512", "AVX-512-BF16", "AMX"]
    assert describe_cpu(AVX2_ONLY).startswith("AMD EPYC 7B13, ")
    assert describe_cpu(AVX2_ONLY).endswith("AVX2")
    assert describe_cpu("model name\t: Neoverse\nFeatures\t: fp asimd\n").endswith("no AVX2")


def test_this_machine_is_described():
    assert "cores" in describe_cpu()

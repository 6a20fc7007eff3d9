"""kernels.host: the host-side integer helpers give what Triton's constexpr functions give."""
import numpy as np
import triton

from kernels.host import cdiv, next_power_of_2


def test_host_helpers_match_triton():
    for n in list(range(0, 300)) + [1023, 1024, 1025, 4096, 65535, 65536, 1 << 20]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    # numpy integers (shapes computed with numpy) as well
    assert next_power_of_2(np.int64(88)) == 128 and cdiv(np.int64(197), 64) == 4

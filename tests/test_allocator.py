"""glibc's mmap threshold, fixed on request by the ``sacpo`` entry point, returns freed activation-sized blocks to the
system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from sacpo_lightning.allocator import DEFAULT_MMAP_THRESHOLD, ENV, mmap_threshold_setting
from sacpo_lightning.errors import UserError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 30 blocks of 8 MiB, each followed by a 96 KiB tensor that stays alive. Both runs first fix the threshold at 64 MiB,
# the state glibc's dynamic threshold reaches after a training step frees its first large blocks (set explicitly so
# the control does not depend on the heap's history): the 8 MiB blocks then come from the heap, and the live tensors
# between them keep the freed space from being trimmed. ``tune_malloc`` must lower it again, so that the blocks are
# mapped and unmapped one by one; a ``tune_malloc`` that changes nothing leaves the run looking like the control.
SCRIPT = """
import ctypes, sys, torch
from sacpo_lightning.allocator import M_MMAP_THRESHOLD, tune_malloc
assert ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 2**20) == 1
if sys.argv[1] == "tuned":
    assert tune_malloc({"SACPO_MALLOC_MMAP_THRESHOLD": "131072"}) == 131072
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mb()
big, small = [], []
for _ in range(30):
    big.append(torch.ones(2 * 2**20))  # 8 MiB
    small.append(torch.ones(24 * 1024))  # 96 KiB: below either threshold, and larger than the free scraps
del big
print(rss_mb() - base)
"""


def retained_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt's M_MMAP_THRESHOLD is glibc's")
def test_fixed_threshold_returns_freed_blocks_a_raised_one_keeps_them():
    control, tuned = retained_mb("control"), retained_mb("tuned")
    assert control > 150, control  # about 240 MiB of freed blocks stay resident
    assert tuned < 30, tuned


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),  # off unless asked for: it costs speed
        ({ENV: str(DEFAULT_MMAP_THRESHOLD)}, DEFAULT_MMAP_THRESHOLD),
        ({ENV: "65536"}, 65536),
        ({ENV: "0"}, None),
        ({ENV: "off"}, None),
        ({"MALLOC_MMAP_THRESHOLD_": "1000000"}, None),  # glibc's own variable: the user's choice stands
        ({"MALLOC_MMAP_THRESHOLD_": "1000000", ENV: "65536"}, None),
    ],
)
def test_setting_from_the_environment(environ, expected):
    assert mmap_threshold_setting(environ) == expected


@pytest.mark.parametrize("value", ["128k", "-5", "yes please"])
def test_bad_setting_names_the_variable(value):
    with pytest.raises(UserError, match=ENV):
        mmap_threshold_setting({ENV: value})

"""The XLA flags the tests compile with (CI test time, session 7 brief "T"): no side effects, so
the modules that subprocesses import (``tests.test_multihost`` etc.) can name it without running
``tests/conftest.py``'s environment setup in the child.

XLA:CPU with its LLVM backend optimisation off: the tests' programs are tiny, so compiling
dominates (a 1-step ``configs/tiny.py:sft`` run: 43 -> 21 CPU s, the same loss). conftest sets it
for the pytest process; subprocess environments that set XLA_FLAGS pass it on, so runs that are
compared with each other compile the same way.
"""

FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"

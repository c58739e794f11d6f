"""`pdbench chaos`: the scenario list, in run order (scenarios that kill engines go last).

Families: bench/chaos_scenarios_network.py (load, faults on the sidecar-to-sidecar
path), bench/chaos_scenarios_process.py (stalls, kills, restarts, drain, client
cancel), bench/chaos_scenarios_hostile.py (hostile input, log hygiene). The stack is
bench/chaos_stack.py, the load generator and results bench/chaos_load.py.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from bench.chaos_load import Result
from bench.chaos_scenarios_hostile import scn_hostile, scn_log_hygiene
from bench.chaos_scenarios_network import (scn_blackhole_prefill_path, scn_load, scn_slow_prefill_path,
                                           scn_transfer_timeout)
from bench.chaos_scenarios_process import (scn_client_cancel, scn_decode_sidecar_restart, scn_drain_decode,
                                           scn_prefill_engine_kill, scn_prefill_engine_restart,
                                           scn_prefill_engine_stall, scn_prefill_sidecar_sigterm)
from bench.chaos_stack import ChaosStack, Profile

# order matters: scenarios that kill engines go last


SCENARIOS: list[tuple[str, Callable[[ChaosStack, Profile], Awaitable[Result]]]] = [
    ("load", scn_load),
    ("hostile", scn_hostile),
    ("slow_prefill_path", scn_slow_prefill_path),
    ("blackhole_prefill_path", scn_blackhole_prefill_path),
    ("transfer_timeout", scn_transfer_timeout),
    ("prefill_engine_stall", scn_prefill_engine_stall),
    ("client_cancel", scn_client_cancel),
    ("prefill_sidecar_sigterm", scn_prefill_sidecar_sigterm),
    ("decode_sidecar_restart", scn_decode_sidecar_restart),
    ("drain_decode", scn_drain_decode),
    ("prefill_engine_kill", scn_prefill_engine_kill),
    ("prefill_engine_restart", scn_prefill_engine_restart),
    ("log_hygiene", scn_log_hygiene),
]

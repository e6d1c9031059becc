"""Planning a run on H100 clusters, used by `tools/plan.py` and `mm1-train --dry-run`: the
memory and step-time model (`h100.estimate`, over `layout`, `memory`, `step_time` and
`h100_constants`), the layout search (`search`) and the plan report (`report`). Modelled, not
measured. Imports only config and model (parameter counts, FLOPs, the LR rule), never
training code."""

from mm1_megatron.plan.h100 import estimate
from mm1_megatron.plan.h100_constants import USABLE_GIB
from mm1_megatron.plan.layout import resolve_layout
from mm1_megatron.plan.report import format_plan, make_plan
from mm1_megatron.plan.search import search

__all__ = ["USABLE_GIB", "estimate", "resolve_layout", "format_plan", "make_plan", "search"]

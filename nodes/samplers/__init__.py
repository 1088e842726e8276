"""Samplers: Self-Forcing's FlowMatch table, Wan's and Cosmos-Predict2.5's UniPC, Euler and CFG."""
from .cfg import cfg_combine, guided
from .flow_match import FlowMatchTable
from .unipc import FlowEuler, FlowUniPC, karras_flow_schedule, shifted_flow_schedule

__all__ = ["FlowMatchTable", "FlowUniPC", "FlowEuler", "shifted_flow_schedule", "karras_flow_schedule", "cfg_combine",
           "guided"]

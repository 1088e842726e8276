"""Samplers: Self-Forcing's FlowMatch table, Wan's UniPC/Euler solvers and CFG."""
from .cfg import cfg_combine, guided
from .flow_match import FlowMatchTable
from .unipc import FlowEuler, FlowUniPC, shifted_flow_schedule

__all__ = ["FlowMatchTable", "FlowUniPC", "FlowEuler", "shifted_flow_schedule", "cfg_combine", "guided"]

"""Autoregressive block sampling (Self-Forcing / Causal-Forcing), independent of the model."""
from .rollout import ARRollout, CallTrace, Denoiser, initial_noise
from .schedule import ARSchedule, StepPlan

__all__ = ["ARRollout", "ARSchedule", "StepPlan", "CallTrace", "Denoiser", "initial_noise"]

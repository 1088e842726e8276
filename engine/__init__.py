"""fd's engine: YAML spec -> validated, typed DAG -> placed, phased, streaming execution."""
from .api import load, load_plan
from .errors import FdError, Location, SpecError, SpecErrors
from .node import BLOCK, REQUIRED, SESSION, Node, Param, Port, Step
from .plan import Plan
from .registry import Registry
from .session import BlockResult, Pipeline, Session
from .spec import Spec, load_spec

__all__ = ["load", "load_plan", "FdError", "Location", "SpecError", "SpecErrors", "BLOCK", "SESSION", "REQUIRED",
           "Node", "Param", "Port", "Step", "Plan", "Registry", "BlockResult", "Pipeline", "Session", "Spec",
           "load_spec"]

"""Parts every model family shares: the model-node load recipe, its params, conv helpers.

A family package (``nodes/wan``, ``nodes/taehv``, ...) may import from here; this
package imports from no family, so families never import each other. Kept
import-light: importing ``nodes.common`` loads no submodule.
"""

"""streamtrain: train causal Transformers on sequences of fixed-width float vectors, as fast as the hardware allows.

The package root stays light: `import streamtrain` imports neither torch nor pyarrow.
"""

__version__ = "0.1.0"

"""Sharding generated attention modules over torch.distributed.

tensor_parallel(module, group)            heads split across ranks (one all-reduce after o_proj)
context_parallel_attention(...)           the sequence split across ranks, K/V passed around a ring
context_parallel(module, group)           a generated module run on this rank's zigzag part of the sequence
"""

from __future__ import annotations

from mlagen.parallel.context import ContextParallel as ContextParallel
from mlagen.parallel.context import context_parallel as context_parallel
from mlagen.parallel.context import context_parallel_attention as context_parallel_attention
from mlagen.parallel.context import zigzag_gather as zigzag_gather
from mlagen.parallel.context import zigzag_merge as zigzag_merge
from mlagen.parallel.context import zigzag_position_ids as zigzag_position_ids
from mlagen.parallel.context import zigzag_split as zigzag_split
from mlagen.parallel.tensor import tensor_parallel as tensor_parallel

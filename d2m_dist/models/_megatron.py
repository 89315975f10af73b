"""megatron-core's pure-torch MoE utilities, imported once.

megatron-core warns at import time that Transformer Engine and Apex are absent;
we only use its unfused torch paths, so the warning is noise here.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe.moe_utils import (  # noqa: F401
        apply_router_token_dropping,
        switch_load_balancing_loss_func,
        topk_routing_with_score_function,
        z_loss_func,
    )

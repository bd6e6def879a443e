"""The optimizer's parameter groups: weight decay on weight matrices only, and layer-wise learning-rate decay."""

from timm.models import group_parameters
from torch import nn

from vit_training.recipes import check_layer_decay

# timm's matcher for a ViTCustomModel, bare or under a head: the embeddings are layer 0, block i is layer i + 1, and
# what matches neither (final norm, pooler, classifier) the top layer.
LAYER_MATCHER = {"embeddings": r"^(?:vit\.)?embeddings\.", "blocks": r"^(?:vit\.)?layers\.(\d+)\."}


def parameter_groups(
    model: nn.Module, weight_decay: float, learning_rate: float, layer_decay: float | None = None
) -> list[dict]:
    """AdamW groups, each with its `lr`, `weight_decay` and, with `layer_decay`, its `lr_scale`.

    Biases, norms, the CLS token and the position embeddings are never decayed: decay would pull them towards zero
    for no regularising benefit. With `layer_decay`, the learning rate of layer `i` (of `num_hidden_layers + 2`) is
    `learning_rate * layer_decay ** (num_hidden_layers + 1 - i)`. The rate is set on each group, so that a
    `LambdaLR` schedule (transformers' `get_scheduler`) multiplies it.
    """
    norms = {id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()}
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if layer_decay is None:
        layer_of, top = dict.fromkeys((name for name, _ in named), 0), 0
    else:
        layer_of = group_parameters(model, LAYER_MATCHER, reverse=True)
        top = max(layer_of.values())
        check_layer_decay(layer_decay, num_hidden_layers=top - 1)
    groups = {}
    for name, parameter in named:
        no_decay = name.endswith(("bias", "cls_token", "position_embeddings")) or id(parameter) in norms
        layer = layer_of[name]
        key = (layer, no_decay)
        if key not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** (top - layer)
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": learning_rate * scale}
            if layer_decay is not None:
                groups[key]["lr_scale"] = scale
        groups[key]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]

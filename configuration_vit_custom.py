"""Configuration of vit-custom, a Vision Transformer (Dosovitskiy et al., 2021) for the Hugging Face Hub."""

from transformers import PreTrainedConfig


# The sizes of the ViT and DeiT papers. Each entry overrides the defaults of `ViTCustomConfig`.
PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "huge": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "intermediate_size": 5120,
        "patch_size": 14,
    },
}

POOLING_MODES = ("cls", "mean")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

# Where the Auto classes find our code in a saved folder or Hub repo (loaded with `trust_remote_code=True`).
AUTO_MAP = {
    "AutoConfig": "configuration_vit_custom.ViTCustomConfig",
    "AutoModel": "modeling_vit_custom.ViTCustomModel",
    "AutoModelForImageClassification": "modeling_vit_custom.ViTCustomForImageClassification",
    "AutoModelForMaskedImageModeling": "modeling_vit_custom.ViTCustomForMaskedImageModeling",
}


class ViTCustomConfig(PreTrainedConfig):
    r"""
    Configuration of a vit-custom model. The defaults build ViT-Base/16 at 224 px; `from_preset` builds the other
    sizes.

    Args:
        image_size (`int` or `(height, width)`): Resolution the position embeddings are learned for.
        patch_size (`int`): Side of the square patches the image is cut into.
        num_channels (`int`): Channels of the input images.
        hidden_size (`int`): Width of every token (D in the paper).
        num_hidden_layers (`int`): Number of encoder blocks (depth).
        num_attention_heads (`int`): Heads of every self-attention layer; must divide `hidden_size`.
        intermediate_size (`int`): Hidden width of the MLP of every block.
        hidden_act (`str`): Activation of the MLP, a key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob (`float`): Dropout after the embeddings, the attention projection and the MLP.
        attention_probs_dropout_prob (`float`): Dropout on the attention weights.
        drop_path_rate (`float`): Stochastic depth of the last block; it grows linearly from 0 at the first block.
        layer_norm_eps (`float`): Epsilon of every LayerNorm.
        initializer_range (`float`): Standard deviation of the truncated normal that initialises the weights.
        qkv_bias (`bool`): Whether the query, key and value projections have a bias.
        use_cls_token (`bool`): Whether a learned CLS token is prepended to the patch tokens.
        pooling (`str`): `"cls"` reads the CLS token after the final LayerNorm; `"mean"` averages the patch tokens
            (never the CLS token) and normalises the average.
        interpolate_pos_encoding (`bool`): Resample the position embeddings to the size of every input, so images
            of any size divisible by the patch size are accepted without a per-call argument.
        encoder_stride (`int`, *optional*): Upsampling factor of the SimMIM decoder of
            `ViTCustomForMaskedImageModeling`; it must equal `patch_size` (the default, when unset), so that the
            reconstruction has the input's size.
    """

    model_type = "vit_custom"

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    qkv_bias: bool = True
    use_cls_token: bool = True
    pooling: str = "cls"
    interpolate_pos_encoding: bool = False
    encoder_stride: int | None = None

    def __post_init__(self, **kwargs):
        if (kwargs.get("num_labels") or 0) < 0:  # transformers would make it 0: a model without a classifier
            raise ValueError(f"num_labels={kwargs['num_labels']} must be a number of classes, or 0 for no classifier.")
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = list(self.image_size)
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self._check_values()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ViTCustomConfig":
        """Build the configuration of a standard size (`tiny`, `small`, `base`, `large`, `huge`) with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {model_type!r} checkpoint, not a {cls.model_type!r} one. Import "
                "it once with `python convert_checkpoint.py SOURCE OUTPUT_DIR`, or load it directly with "
                "`vit_loading.load_model(SOURCE)`."
            )
        return config_dict, kwargs

    @property
    def image_height_width(self) -> tuple[int, int]:
        """`image_size` as a `(height, width)` pair."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return tuple(self.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Number of patches along the height and the width at `image_size`."""
        height, width = self.image_height_width
        return height // self.patch_size, width // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patch tokens: the CLS token, when there is one."""
        return int(self.use_cls_token)

    def _check_values(self):
        if isinstance(self.image_size, list) and len(self.image_size) != 2:
            raise ValueError(f"image_size={self.image_size} must be an int or a (height, width) pair.")
        sizes = {
            "image_size": self.image_height_width,
            "patch_size": (self.patch_size,),
            "num_channels": (self.num_channels,),
            "hidden_size": (self.hidden_size,),
            "num_hidden_layers": (self.num_hidden_layers,),
            "num_attention_heads": (self.num_attention_heads,),
            "intermediate_size": (self.intermediate_size,),
        }
        for name, values in sizes.items():
            if any(not isinstance(value, int) or isinstance(value, bool) or value <= 0 for value in values):
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "choose a number of heads that divides the hidden size."
            )
        height, width = self.image_height_width
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                "use an image size that is a multiple of the patch size."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1).")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be positive.")
        from transformers.activations import ACT2FN

        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is unknown; use the name of one of transformers' activations "
                "(transformers.activations.ACT2FN), e.g. 'gelu', 'gelu_pytorch_tanh' or 'quick_gelu'."
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} is unknown; use one of {PROBLEM_TYPES}, or None.")
        if self.encoder_stride is not None and self.encoder_stride != self.patch_size:
            raise ValueError(
                f"encoder_stride={self.encoder_stride} must equal patch_size={self.patch_size}: the masked-image "
                "decoder turns every patch token back into patch_size x patch_size pixels. Set "
                f"encoder_stride={self.patch_size}, or leave it unset."
            )
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r} is unknown; use one of {POOLING_MODES}.")
        if self.pooling == "cls" and not self.use_cls_token:
            raise ValueError(
                "pooling='cls' needs a CLS token but use_cls_token=False; set use_cls_token=True or pooling='mean'."
            )


__all__ = ["ViTCustomConfig", "PRESETS"]

"""See what the model sees: every explanation against an independent computation of its published formula.

The references are written out here from the papers: a float64 ViT forward from the model's weights (patch embedding as
a convolution) that keeps every attention matrix, and explicit loops over layers, patches and pixel positions in numpy.
"""

import functools

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models._hub import save_for_hf
from transformers import AttentionInterface, ViTConfig, ViTForImageClassification, ViTImageProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import explain
import explain_vit_custom as ex
from conftest import tiny_config
from modeling_vit_custom import ViTCustomForImageClassification
from vit_loading import load_model


def build(**overrides) -> ViTCustomForImageClassification:
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(tiny_config(**overrides))
    with torch.no_grad():  # sharper attention than at initialisation, where every weight is about 1/tokens
        for name, parameter in model.named_parameters():
            if "qkv.weight" in name:
                parameter.mul_(20)
    return model.eval()


def images(batch: int = 2, channels: int = 3, height: int = 16, width: int = 16) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))


def reference_forward(model, pixel_values) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the attention matrix of every layer, softmax(Q K^T / sqrt(d)), in float64 from the weights."""
    config, weights = model.config, {name: value.double() for name, value in model.state_dict().items()}
    heads, hidden = config.num_attention_heads, config.hidden_size
    layer_norm = functools.partial(
        torch.nn.functional.layer_norm, normalized_shape=(hidden,), eps=config.layer_norm_eps
    )
    grid = torch.nn.functional.conv2d(
        pixel_values.double(),
        weights["vit.embeddings.patch_embeddings.projection.weight"],
        weights["vit.embeddings.patch_embeddings.projection.bias"],
        stride=config.patch_size,
    )
    tokens = grid.flatten(2).transpose(1, 2)
    if config.use_cls_token:
        tokens = torch.cat([weights["vit.embeddings.cls_token"].expand(len(tokens), 1, hidden), tokens], dim=1)
    tokens = tokens + weights["vit.embeddings.position_embeddings"]
    attentions = []
    for index in range(config.num_hidden_layers):
        w = {name.split(f"vit.layers.{index}.")[1]: v for name, v in weights.items() if f"layers.{index}." in name}
        normed = layer_norm(tokens, weight=w["layernorm_before.weight"], bias=w["layernorm_before.bias"])
        qkv = normed @ w["attention.qkv.weight"].T + w["attention.qkv.bias"]
        query, key, value = qkv.unflatten(-1, (3, heads, hidden // heads)).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(query @ key.transpose(-1, -2) / (hidden // heads) ** 0.5, dim=-1)
        if attention.requires_grad:
            attention.retain_grad()
        attentions.append(attention)
        mixed = (attention @ value).transpose(1, 2).flatten(2)
        tokens = tokens + mixed @ w["attention.proj.weight"].T + w["attention.proj.bias"]
        normed = layer_norm(tokens, weight=w["layernorm_after.weight"], bias=w["layernorm_after.bias"])
        hidden_mlp = torch.nn.functional.gelu(normed @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"])
        tokens = tokens + hidden_mlp @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
    if config.pooling == "cls":
        pooled = layer_norm(tokens, weight=weights["vit.layernorm.weight"], bias=weights["vit.layernorm.bias"])[:, 0]
    else:
        pooled = layer_norm(
            tokens[:, config.num_prefix_tokens :].mean(dim=1),
            weight=weights["vit.pooler.layernorm.weight"],
            bias=weights["vit.pooler.layernorm.bias"],
        )
    return pooled @ weights["classifier.weight"].T + weights["classifier.bias"], attentions


def reference_rollout(fused: np.ndarray, discard_ratio: float = 0.0) -> np.ndarray:
    """Abnar & Zuidema's rollout, one image and one layer at a time: (layers, batch, T, T) -> (batch, T, T)."""
    num_layers, batch, tokens, _ = fused.shape
    result = np.zeros((batch, tokens, tokens))
    for image in range(batch):
        rollout = np.eye(tokens)
        for layer in range(num_layers):
            matrix = fused[layer, image].copy()
            num_discarded = int(discard_ratio * tokens * tokens)
            if num_discarded:
                lowest = np.argsort(matrix, axis=None)[:num_discarded]
                matrix[np.unravel_index(lowest, matrix.shape)] = 0.0
            matrix = matrix + np.eye(tokens)
            matrix = matrix / matrix.sum(axis=1, keepdims=True)
            rollout = matrix @ rollout
        result[image] = rollout
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Attention weights from any backend


def test_output_attentions_under_sdpa_equal_the_eager_weights_for_that_call_only():
    model, pixel_values = build(), images()
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(pixel_values, output_attentions=True)
    eager_model = build()
    eager_model.set_attn_implementation("eager")
    eager = eager_model(pixel_values, output_attentions=True)
    assert len(sdpa.attentions) == 2
    for sdpa_weights, eager_weights in zip(sdpa.attentions, eager.attentions, strict=True):
        torch.testing.assert_close(sdpa_weights, eager_weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(sdpa.logits, eager.logits, rtol=0, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    assert model(pixel_values).attentions is None


def test_only_the_call_that_asks_for_attention_weights_leaves_the_configured_backend():
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_sdpa)
    model = build()
    model.set_attn_implementation("counting_sdpa")
    assert len(model(images(), output_attentions=True).attentions) == 2
    assert calls == []
    model(images())
    assert len(calls) == 2  # one per layer


def test_attention_maps_equal_the_softmax_of_queries_and_keys():
    model, pixel_values = build(), images()
    _, expected = reference_forward(model, pixel_values)
    maps = ex.attention_maps(model, pixel_values)
    assert maps.shape == (2, 2, 4, 17, 17)
    torch.testing.assert_close(maps, torch.stack(expected).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        ex.attention_maps(model, pixel_values, layers=[-1], heads=[2, 0]), maps[[1]][:, :, [2, 0]]
    )


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_patch_map_reads_the_rows_the_pooled_vector_reads_on_a_non_square_grid(pooling):
    model = build(image_size=[8, 12], pooling=pooling)  # 2 x 3 patches
    matrix = ex.attention_maps(model, images(height=8, width=12))[0]
    grid = ex.patch_map(matrix, (2, 3), 1, pooling)
    assert grid.shape == (2, 4, 2, 3)
    for row in range(2):
        for column in range(3):
            key = 1 + row * 3 + column
            expected = matrix[..., 0, key] if pooling == "cls" else matrix[..., 1:, key].mean(dim=-1)
            torch.testing.assert_close(grid[..., row, column], expected)


# ----------------------------------------------------------------------------------------------------------------------
# Rollout


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.6])
def test_attention_rollout_matches_abnar_and_zuidema(head_fusion, discard_ratio):
    model, pixel_values = build(num_hidden_layers=3), images()
    attentions = ex.attention_maps(model, pixel_values)
    fused = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](attentions.double().numpy(), axis=2)
    rollout = ex.attention_rollout(attentions, head_fusion, discard_ratio)
    np.testing.assert_allclose(rollout.numpy(), reference_rollout(fused, discard_ratio), rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 17))
    # The model's own outputs.attentions are accepted as they are.
    outputs = model(pixel_values, output_attentions=True)
    torch.testing.assert_close(ex.attention_rollout(outputs.attentions, head_fusion, discard_ratio), rollout)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_gradient_rollout_weights_attention_by_the_class_logit_gradient(pooling):
    model, pixel_values = build(pooling=pooling), images()
    reference_input = pixel_values.double().requires_grad_(True)  # so that the attention matrices keep gradients
    logits, attentions = reference_forward(model, reference_input)
    classes = [3, 1]
    logits[torch.arange(2), classes].sum().backward()
    weighted = np.stack([(a.grad * a).clamp(min=0).mean(dim=1).detach().numpy() for a in attentions])

    rollout, explained = ex.gradient_rollout(model, pixel_values, class_index=classes)
    assert explained.tolist() == classes
    np.testing.assert_allclose(rollout.numpy(), reference_rollout(weighted), rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 17))

    _, predicted = ex.gradient_rollout(model, pixel_values)
    assert predicted.tolist() == model(pixel_values).logits.argmax(-1).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# The ViT paper's Figure 7


def test_position_embedding_similarity_is_the_cosine_of_every_pair_of_patches():
    model = build(image_size=[8, 12])  # 2 x 3 patches
    similarity = ex.position_embedding_similarity(model)
    embeddings = model.vit.embeddings.position_embeddings[0, 1:].detach().double().numpy()
    assert similarity.shape == (2, 3, 2, 3)
    for a in range(6):
        for b in range(6):
            cosine = embeddings[a] @ embeddings[b] / np.linalg.norm(embeddings[a]) / np.linalg.norm(embeddings[b])
            assert similarity[a // 3, a % 3, b // 3, b % 3].item() == pytest.approx(cosine, abs=1e-6)


@pytest.mark.parametrize("use_cls_token", [True, False])
def test_mean_attention_distance_weights_patch_distances_in_pixels(use_cls_token):
    pooling = "cls" if use_cls_token else "mean"
    model = build(image_size=[8, 16], use_cls_token=use_cls_token, pooling=pooling)  # 2 x 4 patches of 4 px
    attentions = ex.attention_maps(model, images(height=8, width=16)).double().numpy()
    prefix = int(use_cls_token)
    distances = ex.mean_attention_distance(torch.from_numpy(attentions), (2, 4), 4, prefix)

    positions = [(row, column) for row in range(2) for column in range(4)]
    num_layers, batch, num_heads = attentions.shape[:3]
    expected = np.zeros((num_layers, num_heads))
    for layer in range(num_layers):
        for head in range(num_heads):
            per_query = []
            for image in range(batch):
                for q, (query_row, query_column) in enumerate(positions):
                    weights = attentions[layer, image, head, prefix + q, prefix:]
                    pixels = [4 * np.hypot(query_row - row, query_column - column) for row, column in positions]
                    per_query.append(np.dot(weights, pixels) / weights.sum())
            expected[layer, head] = np.mean(per_query)
    np.testing.assert_allclose(distances.numpy(), expected, rtol=1e-6)
    # Between the distance of a patch to itself and the diagonal of the image (here between patch centres).
    assert (distances >= 0).all() and (distances <= np.hypot(8 - 4, 16 - 4)).all()


def test_attention_to_itself_is_at_distance_zero_and_uniform_attention_at_the_mean_pair_distance():
    tokens = 1 + 6
    itself = torch.eye(tokens).expand(1, 1, 2, tokens, tokens)
    assert ex.mean_attention_distance(itself, (2, 3), 16, 1).abs().max() == 0
    uniform = torch.ones(1, 1, 1, tokens, tokens)
    pairs = [16 * np.hypot(a // 3 - b // 3, a % 3 - b % 3) for a in range(6) for b in range(6)]
    assert ex.mean_attention_distance(uniform, (2, 3), 16, 1).item() == pytest.approx(np.mean(pairs))


@pytest.mark.parametrize("num_channels", [3, 1])
def test_patch_embedding_components_are_the_principal_components_of_the_filters(num_channels):
    model = build(num_channels=num_channels, hidden_size=64, num_attention_heads=4)
    components, explained = ex.patch_embedding_components(model, num_components=5)
    assert components.shape == (5, num_channels, 4, 4)
    filters = model.vit.embeddings.patch_embeddings.projection.weight.detach().double().flatten(1).numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(filters, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    for index in range(5):
        direction = eigenvectors[:, order[index]]
        assert abs(components[index].flatten().double().numpy() @ direction) == pytest.approx(1, abs=1e-5)
        assert explained[index].item() == pytest.approx(eigenvalues[order[index]] / eigenvalues.sum(), rel=1e-4)
        flat = components[index].flatten()
        assert flat[flat.abs().argmax()] > 0


# ----------------------------------------------------------------------------------------------------------------------
# pytorch-grad-cam


@pytest.mark.parametrize("num_prefix_tokens, grid", [(0, (2, 3)), (1, (3, 2)), (5, (2, 2))])
def test_reshape_transform_lays_out_patch_tokens_as_a_feature_map(num_prefix_tokens, grid):
    tokens = torch.randn(2, num_prefix_tokens + grid[0] * grid[1], 7)
    feature_map = ex.reshape_transform(tokens, grid, num_prefix_tokens)
    assert feature_map.shape == (2, 7, *grid)
    for row in range(grid[0]):
        for column in range(grid[1]):
            torch.testing.assert_close(
                feature_map[:, :, row, column], tokens[:, num_prefix_tokens + row * grid[1] + column]
            )


class LogitsOnly(torch.nn.Module):
    """What pytorch-grad-cam calls: a module whose output is the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_grad_cam_runs_on_vit_custom_and_computes_grad_cam(pooling):
    # 1-pixel patches: the CAM is at the input's resolution, so pytorch-grad-cam's resize changes nothing.
    model = build(image_size=[4, 6], patch_size=1, pooling=pooling)
    pixel_values = images(height=4, width=6)
    target = model.vit.layers[-1].layernorm_before
    transform = functools.partial(ex.reshape_transform, grid_size=(4, 6), num_prefix_tokens=1)
    with GradCAM(model=LogitsOnly(model), target_layers=[target], reshape_transform=transform) as cam:
        maps = cam(input_tensor=pixel_values, targets=[ClassifierOutputTarget(2)] * 2)

    # Grad-CAM (Selvaraju et al., 2017): channel weights are the mean gradient over positions.
    captured = {}
    handle = target.register_forward_hook(lambda module, args, output: captured.update(activations=output))
    logit = model(pixel_values).logits[:, 2].sum()
    handle.remove()
    activations = captured["activations"][:, 1:]
    (gradients,) = torch.autograd.grad(logit, captured["activations"])
    weights = gradients[:, 1:].mean(dim=1, keepdim=True)
    expected = (weights * activations).sum(-1).clamp(min=0).reshape(2, 4, 6).detach().numpy()
    expected = expected - expected.min(axis=(1, 2), keepdims=True)
    expected = expected / expected.max(axis=(1, 2), keepdims=True)
    assert maps.shape == (2, 4, 6)
    np.testing.assert_allclose(maps, expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Imported models


def test_attention_maps_of_an_imported_transformers_vit_equal_its_own(tmp_path):
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    source = ViTForImageClassification(config).eval()
    source.save_pretrained(tmp_path)
    pixel_values = images(height=32, width=32)
    expected = torch.stack(source(pixel_values, output_attentions=True).attentions)
    torch.testing.assert_close(ex.attention_maps(load_model(tmp_path)[0], pixel_values), expected, rtol=0, atol=1e-5)


def test_attention_maps_of_an_imported_timm_vit_equal_its_own(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=3,
    ).eval()  # fmt: skip
    captured = []
    for block in source.blocks:
        block.attn.fused_attn = False  # timm's own softmax(q k^T) path, whose weights pass through attn_drop
        block.attn.attn_drop.register_forward_hook(lambda module, args, output: captured.append(output))
    pixel_values = images(height=32, width=32)
    with torch.no_grad():
        source(pixel_values)
    save_for_hf(source, tmp_path / "timm", safe_serialization=True)
    maps = ex.attention_maps(load_model(tmp_path / "timm")[0], pixel_values)
    torch.testing.assert_close(maps, torch.stack(captured), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The command


def save_model_folder(folder, num_channels: int = 3, trained_on_digits: bool = False):
    model = build(num_channels=num_channels, num_labels=10)
    model.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.5] * num_channels, image_std=[0.5] * num_channels
    ).save_pretrained(folder)
    if trained_on_digits:
        ModelCard(f"---\n{ModelCardData(datasets=['sklearn-digits']).to_yaml()}\n---\n# digits\n").save(
            folder / "README.md"
        )
    return model


def test_command_writes_every_figure_for_the_digits_test_images_by_default(tmp_path):
    save_model_folder(tmp_path / "model", num_channels=1, trained_on_digits=True)
    paths = explain.main([str(tmp_path / "model"), "--num_images", "1", "--output_dir", str(tmp_path / "figures")])
    names = sorted(path.name for path in paths)
    assert names == [
        "attention_maps_0_digit0.png", "attention_rollout.png", "gradient_rollout.png", "mean_attention_distance.png",
        "patch_embedding_filters.png", "position_embedding_similarity.png",
    ]  # fmt: skip
    for path in paths:
        with Image.open(path) as figure:
            assert figure.format == "PNG" and figure.width > 200


def test_command_explains_image_files_of_any_size_and_mode(tmp_path):
    save_model_folder(tmp_path / "model")
    files = []
    for name, mode, size in [("cat.png", "RGBA", (40, 30)), ("gray.jpg", "L", (9, 17))]:
        Image.new(mode, size, color=128 if mode == "L" else (200, 10, 10, 255)).save(tmp_path / name)
        files.append(str(tmp_path / name))
    paths = explain.main(
        [str(tmp_path / "model"), "--images", *files, "--output_dir", str(tmp_path / "out"), "--layers", "-1",
         "--heads", "0", "1", "--class_index", "4", "--head_fusion", "max", "--discard_ratio", "0.5"]
    )  # fmt: skip
    assert {"attention_maps_0_cat.png", "attention_maps_1_gray.png"} <= {path.name for path in paths}
    assert all(path.is_file() for path in paths)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_images_are_errors_that_name_the_value():
    model = build()
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\)"):
        ex.attention_maps(model, images(channels=1))
    with pytest.raises(ValueError, match=r"24x16"):
        ex.gradient_rollout(model, images(height=24))


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: ex.attention_maps(m, images(), layers=[2]),
            "layer 2 is out of range: the model has 2 layers, numbered 0 to 1, or -2 to -1 from the end",
        ),
        (lambda m: ex.attention_maps(m, images(), heads=[-5]), "head -5 is out of range: the model has 4 heads"),
        (
            lambda m: ex.gradient_rollout(m, images(), class_index=5),
            "class 5 is out of range: the model has 5 classes, numbered 0 to 4",
        ),
        (lambda m: ex.gradient_rollout(m, images(), class_index=-1), "class -1 is out of range"),
        (lambda m: ex.gradient_rollout(m, images(), class_index=[1, 2, 3]), "names 3 classes for 2 images"),
        (lambda m: ex.attention_rollout(ex.attention_maps(m, images()), "median"), "head_fusion='median' is unknown"),
        (lambda m: ex.attention_rollout(ex.attention_maps(m, images()), discard_ratio=1.0), "discard_ratio=1.0"),
        (lambda m: ex.patch_embedding_components(m, 49), "num_components=49 is out of range: .* 1 to 32"),
        (
            lambda m: ex.mean_attention_distance(ex.attention_maps(m, images()), (3, 3), 4, 1),
            "17 tokens don't match a 3x3 patch grid",
        ),
    ],
    ids=["layer", "head", "class", "negative-class", "class-count", "fusion", "discard", "components", "grid"],
)
def test_out_of_range_arguments_are_errors_that_name_the_valid_range(call, message):
    with pytest.raises(ValueError, match=message):
        call(build())


def test_a_model_without_attention_weights_is_a_clear_error():
    model = build()
    for layer in model.vit.layers:  # as a backend that computes no weights would return
        layer.attention.register_forward_hook(lambda module, args, output: (output[0], None))
    with pytest.raises(ValueError, match="The model returned no attention weights"):
        ex.attention_maps(model, images())
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1))
    expected = r"got ViTForImageClassification \(model_type 'vit'\).*vit_loading\.load_model"
    with pytest.raises(ValueError, match=expected):
        ex.attention_maps(vit, images())


def test_command_errors_name_the_file_or_the_missing_images(tmp_path):
    save_model_folder(tmp_path / "model")
    with pytest.raises(ValueError, match="--images .*missing.png: not an image file"):
        explain.main([str(tmp_path / "model"), "--images", str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="pass image files with --images"):
        explain.main([str(tmp_path / "model"), "--output_dir", str(tmp_path / "out")])

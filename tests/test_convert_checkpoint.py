"""Starting from pretrained ViTs: transformers and timm checkpoints import with exact parity, and export back.

Every source is a tiny randomly initialised model built here (32 px images, 8 px patches, width 32, 2 blocks, 2 heads),
saved the way its library saves it; nothing is downloaded.
"""

import json
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn
from transformers import (
    AutoModelForImageClassification,
    ResNetConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
)

from conftest import assert_same_outputs, tiny_config
from convert_checkpoint import build_parser, convert, main
from modeling_vit_custom import ViTCustomForImageClassification
from vit_loading import export_to_hf_vit, load_model


LOGITS_TOLERANCE = 1e-4
POSITION_TOLERANCE = 1e-5
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value (LayerNorms at identity would hide a misplaced norm)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def hf_vit(folder, model_class=ViTForImageClassification, original_format=True, **overrides):
    """A tiny transformers ViT, saved with `save_pretrained` (the Hub's classic layout unless original_format=False)."""
    config = ViTConfig(image_size=32, patch_size=8, num_labels=3, **{**TINY_VIT, **overrides})
    model = randomized(model_class(config))
    model.save_pretrained(folder, save_original_format=original_format)
    return model


def timm_vit(**kwargs) -> torch.nn.Module:
    args = {**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3), **kwargs}
    return randomized(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args))


def save_timm(model, tmp_path, file_format="hub"):
    """A timm Hub folder (config.json + model.safetensors) or a bare state-dict file."""
    if file_format == "hub":
        save_for_hf(model, tmp_path / "timm", safe_serialization=True)
        return tmp_path / "timm"
    path = tmp_path / f"vit.{file_format}"
    if file_format == "safetensors":
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    return path


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("original_format, qkv_bias", [(True, True), (False, False)], ids=["hub-layout", "v5-layout"])
def test_transformers_vit_imports_with_identical_logits(tmp_path, images, original_format, qkv_bias):
    source = hf_vit(tmp_path / "vit", original_format=original_format, qkv_bias=qkv_bias)
    model, _ = load_model(tmp_path / "vit")
    with torch.no_grad():
        assert max_difference(model(images).logits, source(images).logits) < LOGITS_TOLERANCE
    assert (model.config.layer_norm_eps, model.config.qkv_bias, model.config.hidden_act) == (1e-12, qkv_bias, "gelu")
    assert model.config.pooling == "cls" and model.config.id2label == source.config.id2label


def test_transformers_vit_model_imports_without_its_pooler(tmp_path, images, caplog):
    source = hf_vit(tmp_path / "vit", model_class=ViTModel)
    with caplog.at_level("INFO"):
        model, _ = load_model(tmp_path / "vit", num_labels=4)
    with torch.no_grad():
        difference = max_difference(model.vit(images).last_hidden_state, source(images).last_hidden_state)
    assert difference < LOGITS_TOLERANCE
    assert model.classifier.out_features == 4
    assert "pooler" in caplog.text and "New classification head with 4 labels" in caplog.text


@pytest.mark.parametrize(
    "timm_args, file_format",
    [
        (dict(global_pool="token"), "hub"),
        (dict(global_pool="avg"), "hub"),
        (dict(global_pool="avg", class_token=False, qkv_bias=False), "hub"),
        (dict(global_pool="token", act_layer="gelu_tanh"), "hub"),
        (dict(global_pool="token"), "pth"),
        (dict(global_pool="avg", class_token=False), "safetensors"),
    ],
    ids=["token", "avg", "avg-no-cls-no-qkv-bias", "gelu-tanh", "bare-pth", "bare-safetensors-avg"],
)
def test_timm_vit_imports_with_identical_logits(tmp_path, images, timm_args, file_format):
    source = timm_vit(**timm_args)
    # A bare state dict does not record the heads, and width 32 is no standard ViT's.
    hints = {} if file_format == "hub" else {"num_attention_heads": 2}
    model, _ = load_model(save_timm(source, tmp_path, file_format), **hints)
    with torch.no_grad():
        assert max_difference(model(images).logits, source(images)) < LOGITS_TOLERANCE
    expected_act = "gelu_pytorch_tanh" if timm_args.get("act_layer") else "gelu"
    assert (model.config.layer_norm_eps, model.config.hidden_act) == (1e-6, expected_act)
    assert model.config.qkv_bias == timm_args.get("qkv_bias", True)
    assert model.config.pooling == {"token": "cls", "avg": "mean"}[timm_args["global_pool"]]


def test_convert_writes_a_ready_folder_with_the_source_preprocessing(tmp_path, images):
    source = hf_vit(tmp_path / "vit")
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], size=32).save_pretrained(tmp_path / "vit")
    output = convert(tmp_path / "vit", tmp_path / "converted")

    files = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"configuration_vit_custom.py", "modeling_vit_custom.py"} <= files
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.1, 0.2, 0.3] and processor["image_std"] == [0.4, 0.5, 0.6]
    assert processor["size"] == {"height": 32, "width": 32}
    model = AutoModelForImageClassification.from_pretrained(output, trust_remote_code=True)
    with torch.no_grad():
        assert max_difference(model(images).logits, source(images).logits) < LOGITS_TOLERANCE


def test_timm_preprocessing_comes_from_its_pretrained_cfg(tmp_path):
    folder = save_timm(timm_vit(), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bilinear")
    (folder / "config.json").write_text(json.dumps(config))
    _, processor = load_model(folder, image_size=48)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    assert processor.resample == 2 and processor.size == {"height": 48, "width": 48}


@pytest.mark.parametrize("timm_args", [dict(global_pool="token"), dict(global_pool="avg", class_token=False)])
def test_new_resolution_resamples_position_embeddings_like_timm(tmp_path, images, timm_args):
    source = timm_vit(**timm_args)
    model, _ = load_model(save_timm(source, tmp_path), image_size=48)

    expected = resample_abs_pos_embed(
        source.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=source.num_prefix_tokens
    )
    assert max_difference(model.vit.embeddings.position_embeddings.detach(), expected) < POSITION_TOLERANCE
    timm_at_48 = timm_vit(img_size=48, **timm_args)
    timm_at_48.load_state_dict(checkpoint_filter_fn(source.state_dict(), timm_at_48))
    large_images = torch.nn.functional.interpolate(images, size=48)
    with torch.no_grad():
        assert max_difference(model(large_images).logits, timm_at_48(large_images)) < LOGITS_TOLERANCE


def test_transformers_vit_at_a_new_resolution_resamples_like_timm(tmp_path):
    source = hf_vit(tmp_path / "vit")
    model, _ = load_model(tmp_path / "vit", image_size=[48, 64])
    expected = resample_abs_pos_embed(
        source.vit.embeddings.position_embeddings.detach(), new_size=[6, 8], old_size=[4, 4], num_prefix_tokens=1
    )
    assert max_difference(model.vit.embeddings.position_embeddings.detach(), expected) < POSITION_TOLERANCE


def test_same_labels_keep_the_head_and_new_labels_get_a_new_one(tmp_path, images):
    source = hf_vit(tmp_path / "vit")
    same_as_source = (dict(labels=["LABEL_0", "LABEL_1", "LABEL_2"]), dict(id2label=source.config.id2label), {})
    for same_labels in (*same_as_source, dict(num_labels=3)):
        for head in ("check", "new"):
            kept, _ = load_model(tmp_path / "vit", head=head, **same_labels)
            assert torch.equal(kept.classifier.weight, source.classifier.weight)
            assert kept.config.id2label == source.config.id2label
    relabelled, _ = load_model(tmp_path / "vit", id2label={0: "cat", 1: "dog", 2: "bird"}, head="new")
    assert not torch.equal(relabelled.classifier.weight, source.classifier.weight)
    assert relabelled.config.label2id == {"cat": 0, "dog": 1, "bird": 2}
    with torch.no_grad():  # the backbone is the source's
        difference = max_difference(relabelled.vit(images).pooler_output, source.vit(images).last_hidden_state[:, 0])
    assert difference < LOGITS_TOLERANCE


@pytest.mark.parametrize(
    "new_labels, named",
    [(dict(labels=["cat", "dog"]), "2 (cat, dog)"), (dict(num_labels=4), "4 (LABEL_0, LABEL_1, LABEL_2, LABEL_3)")],
)
def test_labels_that_differ_from_the_head_are_refused_unless_a_new_head_is_asked_for(
    tmp_path, images, new_labels, named
):
    source = timm_vit()  # 3 classes, saved without their names: LABEL_0, LABEL_1, LABEL_2
    path = save_timm(source, tmp_path, "safetensors")
    refused = r"head predicts 3 classes \(LABEL_0, LABEL_1, LABEL_2\) but the data has"
    with pytest.raises(ValueError, match=refused) as error:
        load_model(path, num_attention_heads=2, **new_labels)
    assert named in str(error.value) and "head='new'" in str(error.value)

    model, _ = load_model(path, num_attention_heads=2, head="new", **new_labels)
    assert model.classifier.out_features == int(named[0])
    with torch.no_grad():
        features = source.forward_head(source.forward_features(images), pre_logits=True)
        assert max_difference(model.vit(images).pooler_output, features) < LOGITS_TOLERANCE


def test_a_checkpoint_without_a_head_gets_a_new_one_under_either_policy(tmp_path):
    hf_vit(tmp_path / "vit", model_class=ViTModel)
    for head in ("check", "new"):
        model, _ = load_model(tmp_path / "vit", labels=["cat", "dog"], head=head)
        assert model.classifier.out_features == 2 and model.config.id2label == {0: "cat", 1: "dog"}


def test_an_unknown_head_policy_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="head='keep': choose one of 'check', 'new'"):
        load_model(tmp_path / "missing", head="keep")


def test_imported_model_fine_tunes_with_a_new_head(tmp_path, images):
    hf_vit(tmp_path / "vit")
    model, _ = load_model(tmp_path / "vit", labels=["cat", "dog"], head="new", drop_path_rate=0.1)
    model.train()
    loss = model(images, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss) and all(parameter.grad is not None for parameter in model.parameters())


def test_vit_custom_folder_loads_unchanged_with_fine_tuning_overrides(tmp_path, images):
    source = randomized(ViTCustomForImageClassification(tiny_config(image_size=32, patch_size=8)))
    source.save_pretrained(tmp_path / "custom")
    model, _ = load_model(tmp_path / "custom", drop_path_rate=0.1)
    assert model.config.drop_path_rate == 0.1
    source_weights = source.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source_weights[name]), name
    with torch.no_grad():
        assert_same_outputs(model.eval()(images).logits, source.eval()(images).logits)


def test_another_architecture_is_rejected_by_name(tmp_path):
    ResNetConfig().save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="'resnet' checkpoint"):
        load_model(tmp_path / "resnet")
    (tmp_path / "timm-resnet").mkdir()
    (tmp_path / "timm-resnet" / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    save_file({"conv1.weight": torch.zeros(4, 3, 7, 7)}, tmp_path / "timm-resnet" / "model.safetensors")
    with pytest.raises(ValueError, match="Not a timm VisionTransformer"):
        load_model(tmp_path / "timm-resnet")


def test_missing_tensors_are_named_and_nothing_is_written(tmp_path):
    hf_vit(tmp_path / "vit")
    weights = load_file(tmp_path / "vit" / "model.safetensors")
    del weights["vit.encoder.layer.1.attention.attention.key.weight"]
    save_file(weights, tmp_path / "vit" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors.*vit\.layers\.1\.attention\.qkv\.weight") as error:
        convert(tmp_path / "vit", tmp_path / "converted")
    assert "vit.layers.1.attention.query.weight" in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vit"]

    timm_weights = timm_vit().state_dict()
    del timm_weights["blocks.1.mlp.fc2.bias"]
    save_file(timm_weights, tmp_path / "timm.safetensors")
    with pytest.raises(ValueError, match=r"vit\.layers\.1\.mlp\.fc2\.bias"):
        load_model(tmp_path / "timm.safetensors", num_attention_heads=2)


def test_mismatched_hidden_size_names_the_sizes(tmp_path):
    hf_vit(tmp_path / "vit")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"cls_token: \(1, 1, 32\) in the checkpoint, \(1, 1, 64\) for the config"):
        load_model(tmp_path / "vit")


@pytest.mark.parametrize(
    "timm_args, file_format, message",
    [
        (dict(reg_tokens=1), "hub", "register tokens"),
        (dict(init_values=1e-5), "hub", "layer scale"),
        (dict(no_embed_class=True), "hub", "no_embed_class"),
        (dict(no_embed_class=True), "pth", "no_embed_class"),
        (dict(qk_norm=True), "hub", "qk_norm"),
        (dict(pre_norm=True), "hub", "pre_norm"),
        (dict(global_pool="map"), "hub", "attention pooling"),
        (dict(global_pool="avg", fc_norm=False), "hub", "global_pool='avg'"),
        (dict(global_pool="max"), "hub", "global_pool='max'"),
        (dict(dynamic_img_pad=True), "hub", "dynamic_img_pad"),
    ],
)
def test_unsupported_timm_options_are_rejected_by_name(tmp_path, timm_args, file_format, message):
    source = save_timm(timm_vit(**timm_args), tmp_path, file_format)
    with pytest.raises(ValueError, match=message):
        load_model(source, num_attention_heads=2)


def test_bare_timm_state_dict_of_unusual_width_asks_for_the_heads(tmp_path):
    path = save_timm(timm_vit(), tmp_path, "pth")
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_model(path)


def test_overrides_cannot_change_what_the_weights_fix(tmp_path):
    hf_vit(tmp_path / "vit")
    with pytest.raises(ValueError, match="pooling='mean'"):
        load_model(tmp_path / "vit", pooling="mean")


def test_hub_repo_offline_fails_fast_with_a_clear_message():
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="'vit-custom-tests/not-a-cached-repo' is not a local file or folder"):
        load_model("vit-custom-tests/not-a-cached-repo")
    assert time.monotonic() - started < 10


def test_export_to_transformers_vit_needs_no_remote_code(tmp_path, images):
    model = randomized(ViTCustomForImageClassification(tiny_config(image_size=32, patch_size=8)))
    output = export_to_hf_vit(model, tmp_path / "hf")
    assert not list(output.glob("*.py"))
    assert "auto_map" not in json.loads((output / "config.json").read_text())
    exported = ViTForImageClassification.from_pretrained(output)
    with torch.no_grad():
        assert max_difference(exported(images).logits, model(images).logits) < LOGITS_TOLERANCE


def test_mean_pooled_model_cannot_be_exported(tmp_path):
    model = ViTCustomForImageClassification(tiny_config(pooling="mean"))
    with pytest.raises(ValueError, match="pooling='cls'"):
        export_to_hf_vit(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_command_line_imports_and_exports(tmp_path, images):
    hf_vit(tmp_path / "vit")
    with pytest.raises(SystemExit, match="1"):  # 2 labels for the checkpoint's 3-class head, without a new head
        main([str(tmp_path / "vit"), str(tmp_path / "custom"), "--labels", "cat", "dog"])
    arguments = ["--image_size", "48", "--labels", "cat", "dog", "--ignore_mismatched_sizes"]
    main([str(tmp_path / "vit"), str(tmp_path / "custom"), *arguments])
    model = ViTCustomForImageClassification.from_pretrained(tmp_path / "custom")
    assert model.config.image_size == 48 and model.config.id2label == {0: "cat", 1: "dog"}

    with pytest.raises(SystemExit, match="1"):
        main([str(tmp_path / "vit"), str(tmp_path / "custom")])  # the folder has files and --overwrite is not given

    main([str(tmp_path / "custom"), str(tmp_path / "hf"), "--to_hf_vit"])
    exported = ViTForImageClassification.from_pretrained(tmp_path / "hf")
    large_images = torch.nn.functional.interpolate(images, size=48)
    with torch.no_grad():
        assert max_difference(exported(large_images).logits, model(large_images).logits) < LOGITS_TOLERANCE


def test_every_command_line_flag_has_help():
    actions = [action for action in build_parser()._actions if action.dest != "help"]
    assert actions and all(action.help for action in actions)


def test_from_pretrained_on_a_plain_vit_checkpoint_points_to_the_converter(tmp_path):
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a 'vit' checkpoint, not a 'vit_custom' one.*convert_checkpoint.py"):
        ViTCustomForImageClassification.from_pretrained(tmp_path)

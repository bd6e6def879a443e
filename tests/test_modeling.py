"""ViTCustomModel and ViTCustomForImageClassification: pooling, attention backends, outputs, sizes, training paths."""

import copy

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from conftest import assert_same_outputs, tiny_config
from modeling_vit_custom import ViTCustomForImageClassification, ViTCustomModel, resample_position_embeddings


def build(cls=ViTCustomForImageClassification, **overrides):
    torch.manual_seed(0)
    return cls(tiny_config(**overrides)).eval()


def overwrite_cls_token_after_last_block(model):
    """Replace the CLS token in the last block's output: what a pooler reads after that depends on it or not."""
    new_value = 100 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def hook(module, args, output):
        output = output.clone()
        output[:, 0] = new_value
        return output

    return model.vit.layers[-1].register_forward_hook(hook)


def test_outputs_have_the_transformers_types(pixel_values):
    model = build()
    outputs = model(pixel_values)
    assert isinstance(outputs, ImageClassifierOutput)
    assert outputs.logits.shape == (3, 5)
    base_outputs = model.vit(pixel_values)
    assert isinstance(base_outputs, BaseModelOutputWithPooling)
    assert base_outputs.last_hidden_state.shape == (3, 1 + 16, 32)
    assert base_outputs.pooler_output.shape == (3, 32)


def test_mean_pooling_ignores_cls_token(pixel_values):
    model = build(pooling="mean")
    reference = model.vit(pixel_values).pooler_output
    handle = overwrite_cls_token_after_last_block(model)
    moved = model.vit(pixel_values)
    handle.remove()
    torch.testing.assert_close(moved.pooler_output, reference, rtol=0, atol=0)
    # The overwrite did happen: an average over every token would have moved.
    patches_and_cls = model.vit.pooler.layernorm(moved.last_hidden_state.mean(dim=1))
    assert (patches_and_cls - reference).abs().max() > 1e-2


def test_mean_pooling_is_the_normalised_mean_of_patch_tokens(pixel_values):
    model = build(pooling="mean")
    outputs = model.vit(pixel_values)
    expected = model.vit.pooler.layernorm(outputs.last_hidden_state[:, 1:].mean(dim=1))
    torch.testing.assert_close(outputs.pooler_output, expected)


def test_mean_pooling_without_cls_token(pixel_values):
    model = build(pooling="mean", use_cls_token=False)
    assert model.vit.embeddings.cls_token is None
    outputs = model.vit(pixel_values)
    assert outputs.last_hidden_state.shape == (3, 16, 32)
    torch.testing.assert_close(outputs.pooler_output, model.vit.pooler.layernorm(outputs.last_hidden_state.mean(1)))


def test_cls_pooling_reads_cls_token_after_final_layernorm(pixel_values):
    model = build(pooling="cls")
    outputs = model.vit(pixel_values, output_hidden_states=True)
    last_block_output = outputs.hidden_states[-1]
    torch.testing.assert_close(outputs.last_hidden_state, model.vit.layernorm(last_block_output))
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0])
    handle = overwrite_cls_token_after_last_block(model)
    moved = model.vit(pixel_values).pooler_output
    handle.remove()
    assert (moved - outputs.pooler_output).abs().max() > 1e-2


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_eager_attention_gives_the_same_logits_as_sdpa(pixel_values, pooling):
    model = build(pooling=pooling)
    assert model.config._attn_implementation == "sdpa"
    sdpa_logits = model(pixel_values).logits
    model.set_attn_implementation("eager")
    eager_logits = model(pixel_values).logits
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=0, atol=1e-5)


def test_attn_implementation_at_load_time(tmp_path, pixel_values):
    model = build()
    model.save_pretrained(tmp_path)
    reference = model(pixel_values).logits
    for implementation in ("eager", "sdpa", "flex_attention"):
        loaded = ViTCustomForImageClassification.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        with torch.no_grad():  # flex attention has no CPU backward
            torch.testing.assert_close(loaded(pixel_values).logits, reference, rtol=0, atol=1e-5)


def test_output_attentions_and_hidden_states(pixel_values):
    model = build(num_hidden_layers=3)
    model.set_attn_implementation("eager")
    outputs = model(pixel_values, output_attentions=True, output_hidden_states=True)
    assert len(outputs.attentions) == 3
    assert outputs.attentions[0].shape == (3, 4, 17, 17)
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(3, 4, 17))
    assert len(outputs.hidden_states) == 4
    torch.testing.assert_close(outputs.hidden_states[0], model.vit.embeddings(pixel_values))
    plain = model(pixel_values)
    assert plain.attentions is None and plain.hidden_states is None


def test_return_dict_false_gives_tuples(pixel_values):
    model = build()
    labels = torch.tensor([0, 1, 2])
    loss, logits = model(pixel_values, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, model(pixel_values).logits)
    assert loss.ndim == 0
    last_hidden_state, pooled = model.vit(pixel_values, return_dict=False)
    assert last_hidden_state.shape == (3, 17, 32) and pooled.shape == (3, 32)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_interpolation_switch_accepts_any_multiple_of_the_patch_size(pooling):
    model = build(pooling=pooling, interpolate_pos_encoding=True)
    for height, width in [(16, 16), (24, 16), (8, 32), (32, 32)]:
        logits = model(torch.randn(2, 3, height, width)).logits
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_interpolation_at_the_trained_size_changes_nothing(pixel_values):
    model = build()
    torch.testing.assert_close(
        model(pixel_values, interpolate_pos_encoding=True).logits, model(pixel_values).logits, rtol=0, atol=0
    )


def test_interpolation_matches_timm_resampling():
    model = build()
    position_embeddings = model.vit.embeddings.position_embeddings.detach()
    for new_grid in [(6, 6), (6, 4), (2, 3)]:
        ours = resample_position_embeddings(position_embeddings, new_grid, (4, 4), num_prefix_tokens=1)
        timm = resample_abs_pos_embed(position_embeddings, list(new_grid), [4, 4], num_prefix_tokens=1)
        torch.testing.assert_close(ours, timm, rtol=0, atol=1e-6)


def test_other_image_size_without_interpolation_names_both_sizes():
    model = build()
    with pytest.raises(ValueError, match=r"Input image size \(24x16\) doesn't match the model's image size \(16x16\)"):
        model(torch.randn(1, 3, 24, 16))
    # The per-call argument turns it on without changing the config.
    assert model(torch.randn(1, 3, 24, 16), interpolate_pos_encoding=True).logits.shape == (1, 5)


def test_image_size_not_divisible_by_patch_size_is_rejected():
    model = build(interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"\(18x16\) is not divisible by the patch size 4"):
        model(torch.randn(1, 3, 18, 16))


def test_wrong_channel_count_is_a_clear_error():
    model = build()
    with pytest.raises(
        ValueError, match=r"Expected pixel_values of shape \(batch, 3, height, width\), got \(2, 1, 16, 16\)"
    ):
        model(torch.randn(2, 1, 16, 16))


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    labels = torch.tensor([0, 3, 4])
    model = build(num_hidden_layers=3, hidden_dropout_prob=0.0).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.vit.layers)
    for candidate in (model, checkpointed):
        candidate(pixel_values, labels=labels).loss.backward()
    for (name, param), (_, checkpointed_param) in zip(model.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(checkpointed_param.grad, param.grad, msg=name)


def test_drop_path_grows_linearly_and_only_acts_in_training(pixel_values):
    model = build(num_hidden_layers=3, drop_path_rate=0.2)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.vit.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    torch.testing.assert_close(model(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    runs = [model(pixel_values).logits for _ in range(4)]
    assert any((run - runs[0]).abs().max() > 0 for run in runs[1:])


def test_torch_compile_fullgraph_matches_eager(pixel_values):
    model = build()
    expected = model(pixel_values).logits
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_torch_compile_fullgraph_gives_eager_gradients(pixel_values, pooling):
    # fullgraph=True raises on any graph break; the backward pass runs the graph AOTAutograd compiled for it.
    eager = build(pooling=pooling).train()
    compiled_model = build(pooling=pooling).train()
    compiled = torch.compile(compiled_model, fullgraph=True)
    labels = torch.arange(len(pixel_values)) % eager.config.num_labels
    for model in (eager, compiled):
        model(pixel_values=pixel_values, labels=labels).loss.backward()
    for (name, param), compiled_param in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(
            compiled_param.grad, param.grad, rtol=1e-4, atol=1e-5, msg=lambda message: f"{name}: {message}"
        )


def test_weights_start_as_in_the_vit_paper():
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(tiny_config(hidden_size=256, num_attention_heads=4, intermediate_size=1024))
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert param.abs().max() == 0, name
        elif "layernorm" in name:
            assert (param == 1).all(), name
        else:
            # Truncated normal with std 0.02 (cut at +-2, as in timm: at this std, a plain normal in practice).
            assert abs(param.std().item() - 0.02) < 0.003, name
            assert abs(param.mean().item()) < 0.003, name


def test_weights_at_unaligned_addresses_give_the_same_logits_within_fp32_rounding(pixel_values):
    # What a memory-mapped safetensors file does to a reloaded model, on every machine: each weight starts 4 bytes
    # past a 64-byte boundary, where some CPUs' matmul kernels sum in another order.
    model = build()
    moved = build()
    for parameter, source in zip(moved.parameters(), model.parameters(), strict=True):
        buffer = torch.empty(source.numel() + 16, dtype=source.dtype)
        offset = (-buffer.data_ptr() // 4) % 16 + 1  # elements to the first 64-byte boundary, plus one
        parameter.data = buffer[offset : offset + source.numel()].view_as(source).copy_(source)
        assert parameter.data_ptr() % 64 == 4
    with torch.no_grad():
        assert_same_outputs(moved(pixel_values).logits, model(pixel_values).logits)


def test_from_pretrained_restores_every_tensor_bit_for_bit_and_initialises_a_new_head(tmp_path, pixel_values):
    model = build()
    model.save_pretrained(tmp_path)
    loaded = ViTCustomForImageClassification.from_pretrained(tmp_path).eval()
    for (name, tensor), (_, loaded_tensor) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(loaded_tensor, tensor, rtol=0, atol=0, msg=name)
    # The reloaded weights live in the memory-mapped file, at addresses whose alignment depends on the file's header:
    # some CPUs' kernels then sum in another order. Equal within fp32 rounding; bit for bit only on some machines.
    assert_same_outputs(loaded(pixel_values).logits, model(pixel_values).logits)

    new_head = ViTCustomForImageClassification.from_pretrained(tmp_path, num_labels=9, ignore_mismatched_sizes=True)
    assert new_head.classifier.weight.shape == (9, 32)
    assert torch.isfinite(new_head.classifier.weight).all()
    assert new_head.classifier.bias.abs().max() == 0
    assert 0.005 < new_head.classifier.weight.std() < 0.04
    torch.testing.assert_close(new_head.vit.embeddings.cls_token, model.vit.embeddings.cls_token)


def test_base_model_loads_from_a_classifier_checkpoint(tmp_path, pixel_values):
    model = build()
    model.save_pretrained(tmp_path)
    encoder = ViTCustomModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(encoder(pixel_values).pooler_output, model.vit(pixel_values).pooler_output)


def test_num_labels_zero_returns_pooled_features(pixel_values):
    model = build(num_labels=0)
    torch.testing.assert_close(model(pixel_values).logits, model.vit(pixel_values).pooler_output)

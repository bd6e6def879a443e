"""A saved folder is a Hub model repo: Auto classes, remote code, image processor and pipeline, in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image
from transformers import ViTImageProcessor

from conftest import REPO_ROOT, tiny_config
from modeling_vit_custom import ViTCustomForImageClassification


def save_model_repo(folder) -> ViTCustomForImageClassification:
    torch.manual_seed(0)
    labels = ["cat", "dog", "owl", "fox", "elk"]
    config = tiny_config(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    model = ViTCustomForImageClassification(config).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return model


def run_fresh_python(code: str, cwd, hf_home) -> dict:
    """Runs `code` in a new isolated interpreter (no repo on sys.path) and returns the JSON it prints last."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_save_pretrained_writes_a_shareable_folder(tmp_path):
    save_model_repo(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == [
        "config.json",
        "configuration_vit_custom.py",
        "model.safetensors",
        "modeling_vit_custom.py",
        "preprocessor_config.json",
    ]
    for name in ("configuration_vit_custom.py", "modeling_vit_custom.py"):
        assert (tmp_path / name).read_text() == (REPO_ROOT / name).read_text()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit_custom"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vit_custom.ViTCustomConfig",
        "AutoModel": "modeling_vit_custom.ViTCustomModel",
        "AutoModelForImageClassification": "modeling_vit_custom.ViTCustomForImageClassification",
        "AutoModelForMaskedImageModeling": "modeling_vit_custom.ViTCustomForMaskedImageModeling",
    }


def test_reload_from_fresh_process(tmp_path):
    repo = tmp_path / "repo"
    model = save_model_repo(repo)
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected_logits = model(pixel_values).logits
        expected_pooled = model.vit(pixel_values).pooler_output

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    outputs = run_fresh_python(
        f"""
        import json, sys, torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
        repo = {str(repo)!r}
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
        classifier = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
        encoder = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = classifier(pixels).logits
            pooled = encoder(pixels).pooler_output
        print(json.dumps({{
            "config_class": type(config).__name__,
            "model_type": config.model_type,
            "classifier_module": type(classifier).__module__,
            "encoder_class": type(encoder).__name__,
            "repo_on_path": any({str(REPO_ROOT)!r} == p for p in sys.path),
            "logits": logits.tolist(),
            "pooled": pooled.tolist(),
        }}))
        """,
        cwd=workdir,
        hf_home=tmp_path / "hf_home",
    )
    assert outputs["config_class"] == "ViTCustomConfig" and outputs["model_type"] == "vit_custom"
    assert outputs["classifier_module"].startswith("transformers_modules."), outputs["classifier_module"]
    assert outputs["encoder_class"] == "ViTCustomModel"
    assert not outputs["repo_on_path"]
    torch.testing.assert_close(torch.tensor(outputs["logits"]), expected_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(outputs["pooled"]), expected_pooled, rtol=0, atol=1e-6)


def test_image_processor_and_pipeline_give_labelled_scores(tmp_path):
    repo = tmp_path / "repo"
    model = save_model_repo(repo)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    processor = ViTImageProcessor.from_pretrained(repo)
    with torch.no_grad():
        probabilities = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]

    outputs = run_fresh_python(
        f"""
        import json
        from PIL import Image
        from transformers import AutoImageProcessor, pipeline
        repo = {str(repo)!r}
        processor = AutoImageProcessor.from_pretrained(repo)
        classify = pipeline("image-classification", model=repo, trust_remote_code=True)
        predictions = classify(Image.open({str(tmp_path / "image.png")!r}), top_k=3)
        print(json.dumps({{"processor": type(processor).__name__, "size": [processor.size.height, processor.size.width], "predictions": predictions}}))
        """,
        cwd=tmp_path,
        hf_home=tmp_path / "hf_home",
    )
    assert outputs["processor"].startswith("ViTImageProcessor")
    assert outputs["size"] == [16, 16]
    predictions = outputs["predictions"]
    top = probabilities.topk(3)
    assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([p["score"] for p in predictions], top.values.tolist(), atol=1e-5)

import pytest
import yaml

from pipeline.config import ConfigError, dump_config, fingerprint, load_config


def test_defaults_are_the_reference_hyperparameters():
    cfg = load_config()
    assert cfg.train_cam.epochs == 10 and cfg.train_cam.batch_size == 16 and cfg.train_cam.crop_size == 336
    assert cfg.train_cam.cam_lambda == 0.1 and cfg.eval_cam.threshold == 0.15
    assert (cfg.cam_to_ir_label.conf_fg_thres, cfg.cam_to_ir_label.conf_bg_thres) == (0.35, 0.15)
    walk = cfg.make_sem_seg.walk
    assert (walk.radius, walk.beta, walk.exp_times, cfg.make_sem_seg.bg_threshold) == (5, 10, 8, 0.25)
    assert cfg.make_ins_seg.enabled is False
    assert cfg.train_cam.optimizer.momentum == 1e-4 and cfg.train_irn.optimizer.momentum == 1e-4
    assert (cfg.train_deeplab.optimizer.lr, cfg.train_deeplab.optimizer.momentum,
            cfg.train_deeplab.optimizer.weight_decay) == (2.5e-4, 0.9, 5e-4)
    assert (cfg.crf.gauss_sxy, cfg.crf.bilat_sxy, cfg.crf.bilat_srgb, cfg.crf.bilat_compat) == (1, 67, 3, 4)
    assert (cfg.cam_to_ir_label.crf.bilat_sxy, cfg.cam_to_ir_label.crf.bilat_srgb) == (50, 5)


@pytest.mark.parametrize("override, key", [
    ("train_cam.epochz=3", "train_cam.epochz"),
    ("nonsense=1", "nonsense"),
    ("train_cam.epochs=abc", "train_cam.epochs"),
    ("train_cam.epochs=1.5", "train_cam.epochs"),
    ("train_cam.epochs=0", "train_cam.epochs"),
    ("device=tpu", "device"),
    ("eval_cam.threshold=1.5", "eval_cam.threshold"),
    ("make_cam.cam_source=both", "make_cam.cam_source"),
    ("train_cam.cnn.pretrained=3", "train_cam.cnn.pretrained"),
    ("make_cam.scales=[]", "make_cam.scales"),
    ("train_deeplab.aspp_rates=[]", "train_deeplab.aspp_rates"),
    ("train_deeplab.aspp_rates=[0,2]", "train_deeplab.aspp_rates"),
    ("train_deeplab.msc_scales=[0]", "train_deeplab.msc_scales"),
    ("train_deeplab.loss_resolution=pixels", "train_deeplab.loss_resolution"),
    ("data=3", "data"),
    ("train_irn.optimizer.momentum=-1", "train_irn.optimizer.momentum"),
    ("train_deeplab.optimizer.poly_power=0", "train_deeplab.optimizer.poly_power"),
    ("train_cam.optimizer.kind=adam", "train_cam.optimizer.kind"),
    ("seed=-1", "seed"),
    ("cam_to_ir_label.crf.iters=0", "cam_to_ir_label.crf.iters"),
    ("make_ins_seg.walk.beta=0", "make_ins_seg.walk.beta"),
    ("train_cam.lr=0.1", "train_cam.lr"),              # the old spelling: now optimizer.lr
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train_irn": {"radius": 10, "radiuss": 3}}))
    with pytest.raises(ConfigError, match="train_irn.radiuss"):
        load_config(path)
    path.write_text(yaml.safe_dump({"train_irn": {"epochs": "three"}}))
    with pytest.raises(ConfigError, match="train_irn.epochs"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides_yaml_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_name": "a", "train_cam": {"epochs": 4, "optimizer": {"lr": 0.2}}}))
    cfg = load_config(path, ["train_cam.epochs=7", "make_cam.scales=[1.0, 0.5]", "train_cam.vit.model_kwargs={depth: 2}",
                             "train_cam.cnn.pretrained=/weights/r50.pth", "train_cam.optimizer.momentum=0.9"])
    assert cfg.run_name == "a" and cfg.train_cam.epochs == 7 and cfg.train_cam.optimizer.lr == 0.2
    assert cfg.train_cam.optimizer.momentum == 0.9 and cfg.train_cam.optimizer.weight_decay == 1e-4
    assert cfg.make_cam.scales == [1.0, 0.5]
    assert cfg.train_cam.vit.model_kwargs == {"depth": 2}
    assert cfg.train_cam.cnn.pretrained == "/weights/r50.pth"
    assert load_config(None, ["train_cam.cnn.pretrained=false"]).train_cam.cnn.pretrained is False
    assert isinstance(load_config(None, ["train_cam.optimizer.lr=1"]).train_cam.optimizer.lr, float)  # widened
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train_cam.epochs"])


def test_dump_round_trip_and_fingerprint(tmp_path):
    cfg = load_config(None, ["train_cam.epochs=3", "run_name=x"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert fingerprint(again.train_cam) == fingerprint(cfg.train_cam)
    assert fingerprint(load_config(None, ["train_cam.epochs=4"]).train_cam) != fingerprint(cfg.train_cam)


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"demo.yaml", "voc12.yaml"} <= set(names)
    for path in root.glob("*.yaml"):
        load_config(path)
    voc = load_config(root / "voc12.yaml")
    assert voc.train_cam.cnn.backbone == "resnet152.tv_in1k" and voc.train_cam.vit.name == "deit_small_patch16_224"
    assert voc.make_cam.scales == [1.0, 0.5, 1.5, 2.0, 0.75, 1.25, 1.75]
    assert (voc.train_deeplab.backbone, voc.train_deeplab.iterations, voc.train_deeplab.batch_size,
            voc.train_deeplab.accumulation, voc.train_deeplab.crop_size, voc.train_deeplab.optimizer.lr) == (
        "resnet101", 20000, 5, 2, 321, 2.5e-4)


def test_base_include_merges_and_detects_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"run_name": "a", "train_cam": {"epochs": 3,
                                                                                     "optimizer": {"lr": 0.5}}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml", "train_cam": {"epochs": 4}}))
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.run_name == "a" and cfg.train_cam.epochs == 4 and cfg.train_cam.optimizer.lr == 0.5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "d.yaml"}))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"base": "c.yaml"}))
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "c.yaml")


def test_coco_configs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    coco = load_config(root / "coco.yaml")
    assert coco.data.dataset == "coco" and coco.data.train_split == "train2014"
    assert coco.train_cam.crop_size == 336 and coco.train_deeplab.iterations == 100000
    demo = load_config(root / "demo_coco.yaml")
    assert demo.data.dataset == "coco" and demo.train_cam.cnn.backbone == load_config(root / "demo.yaml").train_cam.cnn.backbone


def test_partial_block_keeps_the_stage_defaults():
    cfg = load_config(None, ["train_deeplab.optimizer.lr=0.01", "train_net.losses.seg.start=5"])
    assert (cfg.train_deeplab.optimizer.momentum, cfg.train_deeplab.optimizer.weight_decay) == (0.9, 5e-4)
    assert (cfg.train_net.losses.seg.weight, cfg.train_net.losses.seg.start) == (0.1, 5)


def test_every_default_passes_its_own_check():
    import dataclasses

    from pipeline.config import Config, check_values

    def walk(obj, prefix=""):
        check_values(obj, prefix)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}.{f.name}" if prefix else f.name)

    walk(Config())

"""Default hyper-parameters of sda-jax: the reference recipe on AFQMC, bert-base-chinese sized.

Every other config starts from this one. Run with:

    python -m sda_jax.train --config configs/default.py --workdir runs/default

Relative paths in data/model keys are resolved against the current directory; the defaults point
at the `shared/` folder beside the repository (or, where a copy of it sits inside the repository,
as on a lent GPU machine, at that one), wherever the command is run from.
"""

import pathlib

import ml_collections

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED = next((p for p in (_REPO / "shared", _REPO.parent / "shared") if (p / "data").is_dir()), _REPO.parent / "shared")


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (one comment per field)."""
    config = ml_collections.ConfigDict()
    config.seed = 2021  # the one seed: init, dropout, data order and fresh heads (with several train.seeds: data order)

    config.data = data = ml_collections.ConfigDict()
    data.source = "files"  # files (the three below) or tfds:NAME, e.g. tfds:clue_afqmc, tfds:glue/mrpc
    data.tfds_splits = ("train", "validation", "test")  # TFDS split names read as train, dev, test
    data.tfds_data_dir = ""  # TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
    data.tfds_manual_dir = ""  # folder with the raw files, for building a TFDS set offline
    data.train_file = str(_SHARED / "data/afqmc/train.json")  # CLUE JSON lines with labels
    data.dev_file = str(_SHARED / "data/afqmc/dev.json")  # CLUE JSON lines with labels, for eval
    data.test_file = str(_SHARED / "data/afqmc/test.json")  # CLUE JSON lines with `id`, no labels
    data.label_names = ("0", "1")  # the label strings of the data set; index = class id
    data.text_a_key = "sentence1"  # JSON field of the first sentence
    data.text_b_key = "sentence2"  # JSON field of the second sentence (absent: single-sentence)
    data.label_key = "label"  # JSON field of the label string
    data.id_key = "id"  # JSON field of the test-row id written to the prediction file
    data.max_seq_len = 64  # tokens per example after truncation, [CLS]/[SEP] included
    data.truncation = "longest_first"  # longest_first (both sentences keep tokens) or reference (the seed's tail cut)
    data.bucket_lengths = ()  # padded lengths a batch may have, one compile each; () = fit to train set
    data.num_buckets = 0  # with bucket_lengths=(): fit this many lengths to the train set; 0: the cost model picks
    data.bucket_multiplier = 200  # bucket sampler chunk = batch_size * this, sorted by length

    config.model = model = ml_collections.ConfigDict()
    model.dir = str(_SHARED / "data/bert-base-chinese")  # HF folder: config.json, vocab.txt, weights
    model.from_scratch = False  # True: random init from config.json; False: the folder needs weights
    model.num_hidden_layers = 0  # >0 overrides config.json (from-scratch / smaller models only)
    model.hidden_size = 0  # >0 overrides config.json
    model.num_attention_heads = 0  # >0 overrides config.json
    model.intermediate_size = 0  # >0 overrides config.json
    model.dtype = "auto"  # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16
    model.scan_layers = True  # nn.scan (+remat) over the encoder layers: ~2x faster GPU compiles; False: unrolled

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 64  # global batch size, split over all devices of all hosts
    train.num_epochs = 1  # passes over the training set
    train.max_steps = 0  # >0 stops after this many steps (short runs, tests)
    train.eval_every = 400  # dev evaluation every this many steps, and always at the end
    train.eval_all_params = True  # also score the student and the teacher on dev (logged, not for "best")
    train.log_every = 20  # steps between host reads of the running loss (each read syncs)
    train.checkpoint_every = 200  # full train-state checkpoint for resume every this many steps
    train.keep_checkpoints = 2  # train checkpoints kept (the best-by-dev one is kept apart)
    train.predict_file = "afqmc_predict.json"  # CLUE submission written into the workdir
    train.seeds = ()  # several, e.g. (2021, 2022, 2023): one model per seed in one program; data order from `seed`
    train.per_seed_predictions = False  # with several seeds: also write each seed's predictions beside the ensemble's

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-5  # peak learning rate after warmup
    optim.warmup_ratio = 0.05  # fraction of all steps with linear warmup from 0, then linear decay to 0
    optim.weight_decay = 0.01  # AdamW decoupled decay; never on biases and LayerNorm
    optim.adam_b1 = 0.9  # Adam first-moment decay
    optim.adam_b2 = 0.999  # Adam second-moment decay
    optim.adam_eps = 1e-8  # Adam epsilon, added to sqrt(v)
    optim.adam_bias_correction = False  # the reference uses AdamW(correct_bias=False)
    optim.lookahead_k = 5  # Lookahead sync period in steps; 0 disables Lookahead
    optim.lookahead_alpha = 1.0  # Lookahead slow-weight step size (the reference's Lookahead(opt, 5, 1))
    optim.max_grad_norm = 0.0  # >0 clips the global gradient norm (the reference does not clip)

    config.sda = sda = ml_collections.ConfigDict()
    sda.teacher_decay = 0.995  # teacher EMA decay cap: min(this, (1 + t) / (10 + t)) at step t
    sda.kd_coeff = 1.0  # loss = CE + kd_coeff * MSE(student logits, teacher logits)
    sda.eval_ema_decay = 0.999  # decay of the separate EMA used for dev evaluation and export
    sda.eval_ema_start_step = 500  # the eval EMA copies the student until this step, averages after
    sda.teacher = "ema"  # ema (reference), window (mean params of last K students: SDA), vote (mean logits: SDV)
    sda.teacher_window = 5  # K, the number of student snapshots of the window/vote teachers

    config.adversarial = adversarial = ml_collections.ConfigDict()
    adversarial.method = "none"  # none, fgm or pgd: perturb the word embeddings along the loss gradient
    adversarial.epsilon = 1.0  # norm of the FGM perturbation; radius of the PGD ball
    adversarial.alpha = 0.3  # norm of each PGD step
    adversarial.steps = 3  # PGD attack steps (each one more forward and backward pass)

    config.fp16 = fp16 = ml_collections.ConfigDict()
    fp16.initial_loss_scale = 2.0**16  # dynamic loss scale start (torch GradScaler default)
    fp16.growth_interval = 2000  # finite steps before the loss scale doubles
    return config

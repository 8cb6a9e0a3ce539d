"""Tests for train.py and training/training_loop.py: CLI smoke runs, exact resume, checkpoints, stats."""

import glob
import json
import os
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from torch_utils.ambient_diffusion import MaskCorruption
from training import snapshots, training_loop
from training.loss import AmbientLoss
from conftest import REPO, random_images, train_options, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001']


@pytest.fixture
def data(tmp_path):
    images = random_images(16, channels=3, resolution=16, seed=2)
    return write_edm_dataset(tmp_path / 'data.zip', images, labels=[i % 2 for i in range(16)])


@pytest.fixture(autouse=True)
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def run(args, expect_ok=True):
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def steps(n, batch=4):
    """--duration (Mimg) of n optimizer steps."""
    return f'--duration={n * batch / 1e6}'


def only_run_dir(outdir):
    dirs = [d for d in glob.glob(os.path.join(outdir, '*')) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_dry_run_prints_config_and_writes_nothing(tmp_path, data):
    out = tmp_path / 'runs'
    result = run(['--outdir', out, '--data', data, '--dry-run', *TINY])
    assert 'Dry run' in result.output and '"class_name": "training.loss.AmbientLoss"' in result.output
    assert '00000-data-uncond-ddpmpp-ambient-gpus1-batch4-fp32' in result.output
    assert not out.exists()


def test_two_ticks_write_run_directory(tmp_path, data):
    out = tmp_path / 'runs'
    run(['--outdir', out, '--data', data, steps(4), '--tick=0.008', '--snap=1', '--dump=1', '--seed=1',
         '--corruption_probability=0.5', '--delta_probability=0.2', *TINY])
    run_dir = only_run_dir(out)
    names = set(os.listdir(run_dir))
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'loss.png', 'training-data.png'} <= names
    assert 'network-snapshot-000000.016.pt' in names and 'training-state-000000.016.pt' in names
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(rows) == 3  # ticks at 1 step, 3 steps and the end
    for row in rows:
        assert {'Loss/loss', 'Loss/loss_hat', 'Progress/kimg', 'Timing/sec_per_kimg', 'timestamp'} <= set(row)
        assert row['Loss/loss']['num'] > 0 and row['Loss/loss']['mean'] > 0
    assert rows[-1]['Progress/kimg']['mean'] == pytest.approx(0.016)
    assert 'tick 2' in open(os.path.join(run_dir, 'log.txt')).read()
    # The snapshot is data: weights_only loading, the network rebuilds from it.
    net, snap = snapshots.load_snapshot(os.path.join(run_dir, 'network-snapshot-000000.016.pt'))
    assert snap['corruption']['corruption_probability'] == 0.5 and snap['nimg'] == 16
    x = torch.zeros(2, 6, 16, 16)
    assert net(x, torch.ones(2)).shape == (2, 3, 16, 16)
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['network_kwargs']['gate'] == 'sigmoid' and options['dataset_kwargs']['hat_seed'] == 1
    # New ambient runs use the mask-aware preconditioning, in the network and in the loss weights alike.
    assert net.hidden_precond == 'mask_aware' and snap['network_kwargs']['hidden_precond'] == 'mask_aware'
    assert options['loss_kwargs']['hidden_precond'] == 'mask_aware'


def test_hidden_precond_original(tmp_path, data):
    result = run(['--outdir', tmp_path, '--data', data, '--dry-run', '--hidden_precond=original', *TINY])
    assert result.output.count('"hidden_precond": "original"') == 2  # network and loss


@pytest.mark.slow
@pytest.mark.parametrize('precond', ['ambient', 'ambient_vp', 'edm', 'vp', 've'])
def test_every_precond_trains(tmp_path, data, precond):
    extra = ['--delta_probability=0'] if precond not in ('ambient', 'ambient_vp') else []
    run(['--outdir', tmp_path, '--data', data, steps(2), '--precond', precond, *extra, *TINY])
    snap = sorted(glob.glob(os.path.join(only_run_dir(tmp_path), 'network-snapshot-*.pt')))[-1]
    net, _ = snapshots.load_snapshot(snap)
    channels = 6 if precond.startswith('ambient') else 3
    assert net(torch.zeros(1, channels, 16, 16), torch.ones(1)).shape == (1, 3, 16, 16)


@pytest.mark.slow
@pytest.mark.parametrize('arch,extra', [('ddpmpp', []), ('ncsnpp', []), ('adm', ['--cbase=64', '--attn=8'])])
def test_every_arch_trains(tmp_path, data, arch, extra):
    run(['--outdir', tmp_path, '--data', data, steps(1), '--arch', arch, *TINY, *extra, '--cond=True'])
    assert glob.glob(os.path.join(only_run_dir(tmp_path), 'network-snapshot-*.pt'))


@pytest.mark.slow  # a training run
def test_augmentation_and_accumulation_run(tmp_path, data, monkeypatch):
    """Every training call of the raw network F gets the augmentation labels, in the configured pipe's layout."""
    from training.networks import SongUNet
    seen = []
    forward = SongUNet.forward

    def recording_forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        if torch.is_grad_enabled():  # the training calls; the module summary runs without gradients
            seen.append((augment_labels, self.map_augment))
        return forward(self, x, noise_labels, class_labels, augment_labels)

    monkeypatch.setattr(SongUNet, 'forward', recording_forward)
    run(['--outdir', tmp_path, '--data', data, steps(2, batch=8), *TINY, '--batch=8', '--batch-gpu=2', '--augment=0.5',
         '--max_grad_norm=1', '--weight_decay=0.01', '--xflip=True', '--dropout=0.1'])
    options = json.load(open(os.path.join(only_run_dir(tmp_path), 'training_options.json')))
    pipe = dnnlib.util.construct_class_by_name(**options['augment_kwargs'])
    assert pipe.label_names == ['xflip', 'yflip', 'rotate_int_x', 'rotate_int_y', 'translate_int_x',
                                'translate_int_y']
    assert options['network_kwargs']['augment_dim'] == pipe.label_dim
    assert len(seen) == 2 * 4  # 2 steps of 4 accumulation rounds
    for labels, map_augment in seen:
        assert labels is not None and labels.shape == (2, pipe.label_dim)
        assert map_augment is not None and map_augment.weight.shape[1] == pipe.label_dim
    labels = torch.cat([labels for labels, _ in seen])
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}  # x-flips happen (p = 0.5) and the labels say which


# ---------------------------------------------------------------------------------------------
# Augmentation of corrupted data, with the pipes train.py configures.


def augment_pipe(augment_set):
    """The AugmentPipe train.py builds for --augment_set (with p = 1)."""
    opts = train_options(['--outdir=unused', '--data=unused', '--augment=1', f'--augment_set={augment_set}'])
    return dnnlib.util.construct_class_by_name(**train.build_config(opts).augment_kwargs)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def corrupted_batch(pattern, p, n=8, resolution=16, mask_channels=3, seed=0):
    """Clean images x0 [n, 3, R, R] float64 in [-1, 1] and masks A, Ã [n, mask_channels, R, R]."""
    x0 = torch.from_numpy(random_images(n, channels=3, resolution=resolution, seed=seed)).permute(0, 3, 1, 2)
    x0 = x0.to(torch.float64) / 127.5 - 1
    corruption = MaskCorruption(pattern, corruption_probability=p, delta_probability=0.3,
                                mask_full_rgb=mask_channels == 1)
    A = corruption.sample_mask([n, 3, resolution, resolution], generator=gen(seed))[:, :mask_channels]
    A_hat = corruption.sample_hat_mask(A, generator=gen(seed + 1))
    return x0, A.to(torch.float64), A_hat.to(torch.float64)


@pytest.mark.parametrize('mask_channels', [1, 3])
@pytest.mark.parametrize('seed', [0, 1])
def test_blit_augmentation_moves_masks_with_the_image(mask_channels, seed):
    """Flips, quarter turns and integer shifts permute pixels, so augmenting [A ⊙ x0, A] together gives exactly
    aug(x0) ⊙ aug(A), with aug(A) what the same transformation does to A seen as an image."""
    pipe = augment_pipe('blit')
    x0, A, A_hat = corrupted_batch('dust', 0.4, mask_channels=mask_channels, seed=seed)
    y, labels, (A_aug, A_hat_aug) = pipe(A * x0, masks=(A, A_hat), generator=gen(seed + 10))
    x0_aug, labels_clean, _ = pipe(x0, generator=gen(seed + 10))
    A_as_image, _, _ = pipe(A, generator=gen(seed + 10))
    A_hat_as_image, _, _ = pipe(A_hat, generator=gen(seed + 10))
    assert torch.equal(labels, labels_clean)  # the draws do not depend on the masks
    assert (labels.abs().sum(1) > 0).sum() >= 6  # most samples were transformed
    assert torch.equal(A_aug, A_as_image) and torch.equal(A_hat_aug, A_hat_as_image)
    assert torch.equal(y, x0_aug * A_aug)
    assert not torch.equal(A_aug, A)
    assert (A_hat_aug <= A_aug).all()


@pytest.mark.parametrize('augment_set,pattern,p', [('blit', 'dust', 0.4), ('edm', 'box', 0.25)])
def test_augmented_hidden_pixels_stay_hidden(augment_set, pattern, p):
    """The augmented observation is zero wherever the augmented A is, whatever the hidden pixels held, and equals
    the augmented clean image where the augmented A is one (warps included)."""
    pipe = augment_pipe(augment_set)
    x0, A, A_hat = corrupted_batch(pattern, p, n=16, resolution=32)
    poisoned = torch.where(A == 1, x0, torch.full_like(x0, 1e3))
    y, labels, (A_aug, A_hat_aug) = pipe(poisoned, masks=(A, A_hat), generator=gen(3))
    y_clean_obs, _, masks_clean_obs = pipe(A * x0, masks=(A, A_hat), generator=gen(3))
    x0_aug, _, _ = pipe(x0, generator=gen(3))
    assert torch.equal(y, y_clean_obs) and torch.equal(A_aug, masks_clean_obs[0])
    assert set(A_aug.unique().tolist()) == {0.0, 1.0} and (A_hat_aug <= A_aug).all()
    assert (y[A_aug == 0] == 0).all()
    torch.testing.assert_close(y * A_aug, x0_aug * A_aug, rtol=0, atol=1e-9)
    assert A_aug.mean() > 0.3 and (labels.abs().sum(1) > 0).sum() >= 12  # not vacuous: transformed, still observed


def test_ambient_loss_passes_augmented_masks_and_labels_to_the_network():
    """With an augment pipe the loss feeds the network [Ã_aug ⊙ (y_aug + σn), Ã_aug] and the pipe's labels, and
    scores D on A_aug only."""
    pipe = augment_pipe('blit')
    x0, A, A_hat = corrupted_batch('dust', 0.4)
    calls = []

    def net(x, sigma, labels=None, augment_labels=None):
        calls.append(dict(x=x.detach().clone(), augment_labels=augment_labels))
        return 0.5 * x[:, :3]

    loss_fn = AmbientLoss(hidden_precond='mask_aware')
    loss, _ = loss_fn(net, A * x0, A, A_hat, augment_pipe=pipe, generator=[gen(s) for s in range(8)],
                      augment_generator=gen(7))
    _, labels, (A_aug, A_hat_aug) = pipe(A * x0, masks=(A, A_hat), generator=gen(7))
    x, augment_labels = calls[0]['x'], calls[0]['augment_labels']
    assert augment_labels is not None and augment_labels.shape == (8, pipe.label_dim)
    assert torch.equal(augment_labels, labels)
    assert torch.equal(x[:, 3:], A_hat_aug.to(x.dtype))
    assert (x[:, :3][A_hat_aug == 0] == 0).all() and (x[:, :3][A_hat_aug == 1] != 0).all()
    assert (loss[A_aug == 0] == 0).all() and (loss[A_aug == 1] > 0).all()


def test_augment_labels_change_the_network_output():
    """The network train.py builds with augmentation has augment_dim = the pipe's label_dim and uses the labels."""
    pipe = augment_pipe('edm')
    opts = train_options(['--outdir=unused', '--data=unused', '--augment=1', '--augment_set=edm', *TINY[:4]])
    c = train.build_config(opts)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = snapshots.build_network(dict(c.network_kwargs, img_resolution=16, img_channels=6)).eval()
    assert net.model.map_augment.weight.shape[1] == pipe.label_dim == 9
    x = torch.randn(2, 6, 16, 16, generator=gen(0))
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.randn(2, pipe.label_dim, generator=gen(1))
    with torch.no_grad():
        D = net(x, sigma, augment_labels=labels)
        D_unaugmented = net(x, sigma, augment_labels=torch.zeros_like(labels))
    assert not torch.equal(D, D_unaugmented)


def _one_step_weights(tmp_path, data, batch_gpu, lr, augment=0.0):
    """The weights after one optimizer step of batch 8, done as 8 / batch_gpu accumulation rounds."""
    out = tmp_path / f'batch_gpu{batch_gpu}-lr{lr}-augment{augment}'
    opts = train_options(['--outdir', out, '--data', data, *TINY, '--batch=8', f'--batch-gpu={batch_gpu}',
                          steps(1, batch=8), '--seed=4', '--delta_probability=0.2', '--deterministic=True',
                          f'--augment={augment}'])
    c = train.build_config(opts)
    # Plain SGD moves the weights by lr·g, so they compare the gradients themselves; Adam's first step,
    # lr·g/(|g| + ε), would not see a gradient off by a constant factor.
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.SGD', lr=lr)
    result = training_loop.training_loop(run_dir=str(out), **c)
    assert result['cur_nimg'] == 8
    states = glob.glob(str(out / 'training-state-*.pt'))
    assert len(states) == 1, states
    return torch.load(states[0], weights_only=True)['net']


@pytest.mark.slow
@pytest.mark.parametrize('augment', [0.0, 0.9])
def test_accumulation_rounds_give_the_same_step(tmp_path, data, augment):
    """--batch-gpu only splits the batch: 1 round x 8 and 4 rounds x 2 give the same gradient step, also with
    augmentation (each image's augmentation is keyed by its sampler position, not drawn per round)."""
    init = _one_step_weights(tmp_path, data, batch_gpu=8, lr=0.0, augment=augment)
    whole = _one_step_weights(tmp_path, data, batch_gpu=8, lr=1.0, augment=augment)
    rounds = _one_step_weights(tmp_path, data, batch_gpu=2, lr=1.0, augment=augment)
    eps = torch.finfo(torch.float32).eps
    moved = 0
    for name, w0 in init.items():
        step_whole = whole[name].double() - w0.double()
        step_rounds = rounds[name].double() - w0.double()
        tolerance = 5e-5 * step_whole.abs().max() + 4 * eps * w0.double().abs().max()
        assert (step_whole - step_rounds).abs().max() <= tolerance, name
        moved += bool(step_whole.abs().max() > 1e3 * eps * w0.double().abs().max())
    assert moved > len(init) // 3  # about half the tensors (buffers included) moved: the comparison is not vacuous


def _final_ema(run_dir):
    snaps = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pt')))
    return torch.load(snaps[-1], weights_only=True)['ema']


@pytest.mark.slow  # 7-12 s on 2 CPU cores: three runs with a worker process each
def test_resume_is_bitwise_exact(tmp_path, data):
    common = ['--data', data, '--seed=3', '--deterministic=True', '--nosubdir', '--tick=0.008', '--snap=1', '--dump=1',
              *TINY, '--dropout=0.2', '--augment=0.5', '--delta_probability=0.3', '--batch-gpu=2', '--workers=1']
    run(['--outdir', tmp_path / 'straight', steps(6), *common])
    run(['--outdir', tmp_path / 'split', steps(3), *common])
    run(['--outdir', tmp_path / 'split', steps(6), '--resume', tmp_path / 'split', *common])
    a, b = _final_ema(tmp_path / 'straight'), _final_ema(tmp_path / 'split')
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The resumed run appended to the same stats file.
    rows = [json.loads(line) for line in open(tmp_path / 'split' / 'stats.jsonl')]
    assert rows[-1]['Progress/kimg']['mean'] == pytest.approx(0.024)


def test_resume_refuses_changed_config(tmp_path, data):
    run(['--outdir', tmp_path, '--data', data, steps(1), '--nosubdir', *TINY])
    result = run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, *TINY, '--cbase=16'], expect_ok=False)
    assert result.exit_code != 0 and 'network_kwargs.model_channels' in result.output
    result = run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, *TINY,
                  '--corruption_probability=0.7'], expect_ok=False)
    assert 'corruption.corruption_probability' in result.output


@pytest.mark.slow  # two training runs
def test_transfer_initialises_weights(tmp_path, data):
    run(['--outdir', tmp_path / 'a', '--data', data, steps(1), '--nosubdir', *TINY])
    snap = glob.glob(str(tmp_path / 'a' / 'network-snapshot-*.pt'))[0]
    run(['--outdir', tmp_path / 'b', '--data', data, steps(1), '--nosubdir', '--transfer', snap, *TINY, '--lr=1e-12'])
    a = torch.load(snap, weights_only=True)['ema']
    b = _final_ema(tmp_path / 'b')
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / 'state.pt'
    snapshots.atomic_torch_save({'x': torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'partial bytes')
        raise RuntimeError('killed during save')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(RuntimeError, match='killed'):
        snapshots.atomic_torch_save({'x': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.ones(3))
    assert os.listdir(tmp_path) == ['state.pt']


@pytest.mark.parametrize('args,message', [
    (['--batch=6', '--batch-gpu=4'], 'divisible'),
    (['--cond=True', '--data=NOLABELS'], 'labels'),
    (['--precond=edm', '--norm=1'], '--norm=1 only applies'),
    (['--precond=vp', '--delta_probability=0.2'], '--delta_probability'),
    (['--precond=edm', '--delta_probability=0', '--hidden_precond=mask_aware'], '--hidden_precond only applies'),
    (['--data=MISSING'], 'dataset not found'),
    (['--corruption_probability=1.0'], 'corruption_probability'),
])
def test_validation_errors(tmp_path, data, args, message):
    nolabels = write_edm_dataset(tmp_path / 'nolabels.zip', random_images(4, resolution=16))
    args = [a.replace('NOLABELS', nolabels).replace('MISSING', str(tmp_path / 'missing.zip')) for a in args]
    base = ['--outdir', tmp_path / 'runs', '--data', data, *TINY]
    result = run(base + args, expect_ok=False)
    assert result.exit_code != 0 and message in result.output, result.output


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, data):
    """torchrun with 2 gloo processes and the same global batch gives the same weights as one process."""
    common = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    args = ['train.py', '--data', data, '--seed=5', '--nosubdir', steps(3), *TINY, '--ema=0']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for nproc, out in ((1, 'one'), (2, 'two')):
        subprocess.run(common + [f'--nproc_per_node={nproc}'] + args + ['--outdir', str(tmp_path / out)],
                       cwd=REPO, env=env, check=True, capture_output=True)
    a, b = _final_ema(tmp_path / 'one'), _final_ema(tmp_path / 'two')
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    la = [json.loads(l)['Loss/loss']['mean'] for l in open(tmp_path / 'one' / 'stats.jsonl')]
    lb = [json.loads(l)['Loss/loss']['mean'] for l in open(tmp_path / 'two' / 'stats.jsonl')]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.slow  # a training run and a resume
def test_states_from_before_hidden_precond_resume_with_the_original_formulation(tmp_path, data):
    """A state written before --hidden_precond existed has no such keys: it was trained with the original formulation."""
    run(['--outdir', tmp_path, '--data', data, steps(1), '--nosubdir', '--dump=1', '--hidden_precond=original',
         '--cond_sigma_min=0', *TINY])
    state_path = snapshots.find_latest_state(str(tmp_path))
    state = torch.load(state_path, weights_only=True)
    for key in ('network_kwargs', 'loss_kwargs'):
        del state['config'][key]['hidden_precond']
    torch.save(state, state_path)
    refused = run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, *TINY], expect_ok=False)
    assert refused.exit_code != 0 and "hidden_precond: 'original' in the state, 'mask_aware' now" in refused.output
    run(['--outdir', tmp_path, '--data', data, steps(2), '--resume', tmp_path, '--hidden_precond=original',
         '--cond_sigma_min=0', *TINY])


def test_loss_must_fit_the_network():
    from training.loss import AmbientLoss
    from training.networks import EDMPrecond
    net = EDMPrecond(16, 2, ambient=True, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[], hidden_precond='mask_aware')
    training_loop.check_loss_fits_network(AmbientLoss(hidden_precond='mask_aware'), net)
    with pytest.raises(ValueError, match="loss_kwargs.hidden_precond='original' differs"):
        training_loop.check_loss_fits_network(AmbientLoss(), net)


def test_ema_update_is_the_half_life_average_and_copies_buffers():
    """EDM's EMA: β = 0.5^(batch/half-life in images) (half-life ramped to cur_nimg·ratio); ema ← β·ema + (1 − β)·net."""
    from training.training_loop import _update_ema
    torch.manual_seed(0)
    net, ema = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for p in (*net.parameters(), *ema.parameters()):
            p.normal_()
    net.running_mean.normal_()
    before = [p.detach().double().clone() for p in ema.parameters()]
    _update_ema(ema, net, cur_nimg=1000, batch_size=64, ema_halflife_kimg=0.5, ema_rampup_ratio=0.05)
    beta = 0.5 ** (64 / min(500, 1000 * 0.05))
    for old, p_ema, p_net in zip(before, ema.parameters(), net.parameters()):
        torch.testing.assert_close(p_ema.double(), beta * old + (1 - beta) * p_net.double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ema.running_mean, net.running_mean)


@pytest.mark.slow  # two short runs
def test_channels_last_trains_the_same_weights(tmp_path, data):
    """--channels_last changes the memory layout only: the same steps give the same weights (up to kernel rounding)."""
    common = ['--data', data, '--seed=3', '--nosubdir', *TINY, steps(3), '--tick=0.008', '--snap=1']
    run(['--outdir', tmp_path / 'plain', *common])
    run(['--outdir', tmp_path / 'cl', '--channels_last=True', *common])
    a, b = _final_ema(tmp_path / 'plain'), _final_ema(tmp_path / 'cl')
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert json.load(open(tmp_path / 'cl' / 'training_options.json'))['channels_last'] is True


@pytest.mark.slow  # three short runs
def test_bf16_trains_on_cpu_and_fp16_is_refused(tmp_path, data):
    """--fp16=bf16 trains on a CPU (float32 weights, the network in bfloat16) close to float32 training;
    --fp16=True (float16) needs CUDA and says so."""
    if torch.cuda.is_available():
        pytest.skip('the float16 refusal applies without CUDA')
    common = ['--data', data, '--seed=3', '--nosubdir', *TINY, steps(2), '--tick=0.008', '--snap=1']
    run(['--outdir', tmp_path / 'fp32', *common])
    run(['--outdir', tmp_path / 'bf16', '--fp16=bf16', *common])
    a, b = _final_ema(tmp_path / 'fp32'), _final_ema(tmp_path / 'bf16')
    assert all(b[name].dtype == a[name].dtype for name in a)
    moved = [(b[n] - a[n]).abs().max() for n in a if a[n].is_floating_point()]
    assert 0 < max(moved) < 0.02  # bfloat16 arithmetic changes the steps a little, not the weights' scale
    result = run(['--outdir', tmp_path / 'half', '--fp16=True', *common], expect_ok=False)
    assert result.exit_code != 0 and 'float16 needs a CUDA device' in result.output and '--fp16=bf16' in result.output


def test_fp16_option_values():
    from conftest import train_options
    base = ['--outdir=unused', '--data=unused']
    for value, expected in (('False', False), ('True', True), ('fp16', True), ('bf16', 'bf16')):
        assert train.build_config(train_options(base + [f'--fp16={value}'])).network_kwargs.use_fp16 == expected
    with pytest.raises(click.BadParameter, match='bf16'):
        train_options(base + ['--fp16=int8'])


def test_ema_update_of_a_network_without_buffers_or_parameters():
    from training.training_loop import _update_ema
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    _update_ema(ema, net, cur_nimg=0, batch_size=4, ema_halflife_kimg=0.5, ema_rampup_ratio=None)
    _update_ema(torch.nn.Identity(), torch.nn.Identity(), cur_nimg=0, batch_size=4, ema_halflife_kimg=0.5,
                ema_rampup_ratio=None)


def test_rng_states_of_another_world_size_are_reseeded_per_process():
    from training.training_loop import _rng_state, _set_rng_state
    saved = [_rng_state(), _rng_state()]  # two processes' states; this test runs as one process
    _set_rng_state(saved, seed=5, nimg=64)
    a = torch.rand(3)
    _set_rng_state(saved, seed=5, nimg=64)
    assert torch.equal(torch.rand(3), a)
    _set_rng_state(saved, seed=5, nimg=128)
    assert not torch.equal(torch.rand(3), a)


@pytest.mark.slow  # three short runs
def test_resume_with_another_channels_last_setting_continues_the_same_run(tmp_path, data):
    """The optimizer's moments follow the parameters' memory layout on resume (fused Adam pairs by storage order)."""
    common = ['--data', data, '--seed=3', '--nosubdir', *TINY, '--tick=0.004', '--snap=1', '--dump=1', '--lr=1e-2']
    run(['--outdir', tmp_path / 'straight', steps(3), *common])
    run(['--outdir', tmp_path / 'split', steps(1), *common])
    run(['--outdir', tmp_path / 'split', steps(3), '--channels_last=True', '--resume', tmp_path / 'split', *common])
    a, b = _final_ema(tmp_path / 'straight'), _final_ema(tmp_path / 'split')
    # Kernel rounding only. Adam's g/sqrt(v) magnifies it in a few elements whose gradients are near zero, so the
    # bound is on the mean: moments paired with the wrong elements move most weights by about lr.
    diffs = torch.cat([(a[name].double() - b[name].double()).abs().flatten() for name in a])
    assert float(diffs.mean()) < 1e-5  # 3e-7 here; 1.5e-3 when the moments keep the other layout

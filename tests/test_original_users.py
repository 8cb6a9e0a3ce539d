"""What users of the original ambient-diffusion code rely on: no option silently ignored, --transfer from the
original's .pkl, the all-pixel loss diagnostic (the original's loss_test) that never reaches the gradient."""

import glob
import os
import json
import math
import pickle

import pytest
import torch
from click.testing import CliRunner

import train
from training import snapshots
from training.loss import AmbientLoss
from conftest import random_images, write_edm_dataset

TINY = ['--cbase=8', '--cres=1,2', '--num_blocks=1', '--attn=8', '--batch=4', '--lr=1e-3', '--lr_rampup=0',
        '--workers=0', '--augment=0', '--dropout=0', '--ema=0.001', '--duration=0.000008', '--nosubdir']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_edm_dataset(tmp_path_factory.mktemp('data') / 'data.zip', random_images(8, channels=3, resolution=16, seed=4))


def invoke(args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


@pytest.mark.parametrize('args, needle', [
    (['--experiment_name=x'], '--experiment_name has no effect'),  # TINY has --nosubdir
    (['--experiment_name=x', '--desc=y', '--wandb=offline'], '--desc has no effect'),
    (['--gated=False', '--gate=double_sigmoid'], '--gate has no effect'),
    (['--corruption_pattern=box', '--mask_full_rgb=True'], '--mask_full_rgb has no effect'),
    (['--fp16=True'], '--fp16 has no effect'),
    (['--augment=0', '--augment_set=edm'], '--augment_set has no effect'),
    (['--desc=name'], '--desc has no effect'),
    (['--deterministic=True', '--bench=True'], '--bench has no effect'),
    (['--precond=edm', '--delta_probability=0', '--clean_diagnostics=True'], 'every pixel'),
])
def test_train_refuses_options_that_would_be_ignored(tmp_path, data, args, needle):
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, *args])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / 'run').exists()


def test_the_same_options_at_their_defaults_are_fine(tmp_path, data):
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, '--dry-run'])
    assert result.exit_code == 0, result.output


def test_resume_keeps_its_seed(tmp_path, data):
    run = tmp_path / 'run'
    assert invoke(['--outdir', run, '--data', data, *TINY, '--seed=3']).exit_code == 0
    result = invoke(['--outdir', run, '--data', data, *TINY, '--duration=0.000016', '--resume', run, '--seed=4'])
    assert result.exit_code != 0 and "differs from the run's seed 3" in result.output


@pytest.mark.slow
def test_transfer_from_the_originals_pickle(tmp_path, data):
    """An original .pkl (dict with the EMA state dict under DDP/compile prefixes) initialises a new run's weights,
    read by the restricted unpickler."""
    run = tmp_path / 'a'
    assert invoke(['--outdir', run, '--data', data, *TINY]).exit_code == 0
    ema = torch.load(glob.glob(str(run / 'network-snapshot-*.pt'))[-1], weights_only=True)['ema']
    original = tmp_path / 'network-snapshot-000000.pkl'
    with open(original, 'wb') as f:
        pickle.dump(dict(ema={f'_orig_mod.module.{k}': v for k, v in ema.items()}, dataset_kwargs={}), f)
    assert snapshots.read_weights(original).keys() == ema.keys()
    result = invoke(['--outdir', tmp_path / 'b', '--data', data, *TINY, '--transfer', original, '--lr=1e-12'])
    assert result.exit_code == 0, result.output
    b = torch.load(glob.glob(str(tmp_path / 'b' / 'network-snapshot-*.pt'))[-1], weights_only=True)['ema']
    assert all(torch.allclose(ema[k], b[k], atol=1e-6) for k in ema)


def test_clean_diagnostics_report_every_pixel_and_never_reach_the_gradient(tmp_path, data):
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, '--clean_diagnostics=True',
                     '--corruption_probability=0.5'])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert all('Loss/loss_all' in row for row in rows)

    torch.manual_seed(0)
    net = torch.nn.Conv2d(6, 3, 3, padding=1)
    x0 = torch.randn(2, 3, 8, 8)
    A = (torch.rand(2, 3, 8, 8) > 0.5).float()
    A_hat = A * (torch.rand(2, 3, 8, 8) > 0.2).float()
    grads = []
    for clean in (None, x0):
        net.zero_grad()
        gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
        loss, diagnostics = AmbientLoss()(lambda x, s, l, augment_labels=None: net(x), A * x0, A, A_hat, clean=clean,
                                          generator=gen)
        loss.sum().backward()
        grads.append(net.weight.grad.clone())
        assert ('loss_all' in diagnostics) == (clean is not None)
    assert torch.equal(grads[0], grads[1])


@pytest.fixture(scope='module')
def snapshot(tmp_path_factory, data):
    run = tmp_path_factory.mktemp('run') / 'run'
    assert invoke(['--outdir', run, '--data', data, *TINY]).exit_code == 0
    return glob.glob(str(run / 'network-snapshot-*.pt'))[-1]


@pytest.fixture(scope='module')
def clean_snapshot(tmp_path_factory, data):
    run = tmp_path_factory.mktemp('clean') / 'run'
    result = invoke(['--outdir', run, '--data', data, *TINY, '--precond=edm', '--delta_probability=0'])
    assert result.exit_code == 0, result.output
    return glob.glob(str(run / 'network-snapshot-*.pt'))[-1]


@pytest.mark.parametrize('args, needle', [
    (['--guidance_scale=1'], '--guidance_scale has no effect'),
    (['--num_masks=2', '--resample_guidance_masks'], '--resample_guidance_masks has no effect'),
])
def test_generate_refuses_options_that_would_be_ignored(tmp_path, snapshot, args, needle):
    import eval as eval_cli
    result = CliRunner().invoke(eval_cli.cli, ['generate', f'--network={snapshot}', f'--outdir={tmp_path / "g"}',
                                               '--seeds=0', '--steps=2', *args])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / 'g').exists()


def test_generate_refuses_ambient_options_for_a_clean_network(tmp_path, clean_snapshot):
    import eval as eval_cli
    result = CliRunner().invoke(eval_cli.cli, ['generate', f'--network={clean_snapshot}', f'--outdir={tmp_path / "g"}',
                                               '--seeds=0', '--steps=2', '--clipping=dynamic'])
    assert result.exit_code != 0 and '--clipping has no effect' in result.output, result.output


@pytest.mark.parametrize('args, needle', [
    (['--corruption_pattern=averaging', '--kernel_std=2'], '--kernel_std has no effect'),
    (['--corruption_pattern=blurring', '--blur_type=motion', '--kernel_std=2'], '--kernel_std has no effect'),
    (['--corruption_pattern=blurring', '--intensity=0.3'], '--intensity has no effect'),
    (['--corruption_pattern=dust', '--num_measurements=8'], '--num_measurements has no effect'),
    (['--corruption_pattern=box_masking', '--operator_mask_full_rgb=False'], '--operator_mask_full_rgb has no effect'),
    (['--corruption_pattern=dust', '--guidance_scale=2'], '--guidance_scale has no effect'),
])
def test_solve_refuses_options_of_another_operator(tmp_path, data, snapshot, args, needle):
    import solve_inverse_problems
    result = CliRunner().invoke(solve_inverse_problems.main, [f'--network={snapshot}', f'--measurements_path={data}',
                                                              f'--outdir={tmp_path / "s"}', '--seeds=0', *args])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / 's').exists()


def _original_guided_heun(net, x, masks, t_steps, lam):
    """The original eval.py sampler step by step (upstream-behaviour §2.x), float64, no clipping, no churn:
    d = (t_{i+1} − t̂)(x − D_0)/t̂ − λ·∇_x[½K·Σ_j‖D_0 − D_j‖²] in both Heun stages."""
    K = masks.shape[1]

    def d_and_grad(x, t):
        x = x.detach().requires_grad_(True)
        D = torch.stack([net(torch.cat([masks[:, j] * x, masks[:, j]], 1), t)[:, :3] for j in range(K)], 1)
        G = torch.autograd.grad(0.5 * K * (D[:, :1] - D[:, 1:]).square().sum(), x)[0]
        return D[:, 0].detach(), G

    x = x * t_steps[0]
    N = len(t_steps) - 1
    for i in range(N):
        t_hat, t_next = t_steps[i], t_steps[i + 1]
        D0, G = d_and_grad(x, t_hat)
        d1 = (t_next - t_hat) * (x - D0) / t_hat - lam * G
        x1 = x + d1
        if i < N - 1:
            D0p, Gp = d_and_grad(x1, t_next)
            d2 = (t_next - t_hat) * (x1 - D0p) / t_next - lam * Gp
            x = x + 0.5 * (d1 + d2)
        else:
            x = x1
    return x


class _ToyAmbientNet(torch.nn.Module):
    """A small float64 ambient denoiser ([M ⊙ x, M] in, C channels out) for step-by-step sampler comparisons."""
    ambient = True

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 3, 3, padding=1).double()

    def forward(self, x, sigma, class_labels=None, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return torch.tanh(self.conv(x / (1 + sigma ** 2).sqrt()))


def test_guidance_in_the_originals_units_takes_the_originals_steps():
    from training import samplers

    torch.manual_seed(0)
    net = _ToyAmbientNet()
    latents = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    masks = (torch.rand(2, 3, 3, 8, 8) > 0.4).double()
    lam = 0.7
    ours = samplers.ambient_sampler(net, latents, masks, num_steps=4, sigma_max=5, guidance_scale=lam,
                                    guidance_units='original')
    t_steps = samplers.edm_time_steps(4, 0.002, 5, 7)
    reference = _original_guided_heun(net, latents, masks, t_steps, lam)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    # In our units the same number is a weaker push: the results differ.
    assert not torch.allclose(samplers.ambient_sampler(net, latents, masks, num_steps=4, sigma_max=5,
                                                       guidance_scale=lam), reference, atol=1e-6)


def test_the_originals_fid_command_runs_unchanged(tmp_path):
    """The original README's FID command (paths changed; --steps and our --detector added to keep it tiny), on an
    original .pkl run directory: eval.py without a subcommand generates the first --num seeds and scores them."""
    import eval as eval_cli
    from fixtures import save_tiny_detector
    from test_snapshots import original_network, write_original_run
    run = tmp_path / 'checkpoints'
    write_original_run(str(run), original_network(), tmp_path / 'sentinel')
    detector = save_tiny_detector(str(tmp_path / 'detector.pt'), seed=3, feature_dim=8)
    data = write_edm_dataset(tmp_path / 'data.zip', random_images(8, 3, 16, seed=5))
    result = CliRunner().invoke(eval_cli.cli, ['ref', '--data', data, '--dest', tmp_path / 'ref.npz', '--detector',
                                               detector, '--batch=4', '--workers=0'])
    assert result.exit_code == 0, result.output
    command = ['--network', run, '--ref', tmp_path / 'ref.npz', '--outdir', tmp_path / 'out', '--experiment_name=exp',
               '--seeds=0-49999', '--batch=16', '--corruption_probability=0.4', '--delta_probability=0.1',
               '--mask_full_rgb=True', '--num_masks=1', '--guidance_scale=0.0',
               '--training_options_loc', run / 'training_options.json', '--num=4', '--with_wandb=False']
    result = CliRunner().invoke(eval_cli.cli, [str(a) for a in command + ['--steps=2', '--detector', detector,
                                                                          '--workers=0']])
    assert result.exit_code == 0, result.output
    assert len(glob.glob(str(tmp_path / 'out' / '000100' / '*.png'))) == 4
    record = json.loads(open(tmp_path / 'out' / 'metrics.jsonl').read())
    assert record['num_images'] == 4 and record['fid'] >= 0
    assert not (tmp_path / 'sentinel').exists()
    # The original's flags that crashed it are refused with what to do.
    result = CliRunner().invoke(eval_cli.cli, [str(a) for a in command + ['--disc=vp']])
    assert result.exit_code != 0 and 'EDM schedule' in result.output


def test_preset_original_builds_the_originals_network(tmp_path):
    """train.py --preset=original on 32x32 data builds exactly the parameter names and shapes of the original's
    gated DDPM++ (tests/golden/ddpmpp32_keys.txt, the layout of the released CIFAR-10 checkpoints)."""
    from conftest import train_options
    from test_golden import load_golden_module
    from training import training_loop
    data = write_edm_dataset(tmp_path / 'data32.zip', random_images(4, 3, 32, seed=1))
    opts = train_options(['--outdir', tmp_path, '--data', data, '--preset=original'])
    train.apply_preset(opts)
    c = train.build_config(opts)
    assert c.dataset_kwargs.fixed_hat_mask and c.loss_kwargs.hidden_precond == 'original'
    from training.dataset import ImageFolderDataset
    kwargs = training_loop.network_kwargs_for(c.network_kwargs, ImageFolderDataset(data))
    with torch.device('meta'):
        net = snapshots.build_network(kwargs)
    golden = load_golden_module()
    with open(golden.GOLDEN) as f:
        expected = [line.rstrip('\n') for line in f if line.strip()]
    assert [golden.format_line(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected


@pytest.mark.slow  # a training run
def test_the_originals_celeba_command_trains_with_the_preset(tmp_path):
    """The original README's CelebA command plus --preset=original (and a tiny network and duration, to run on
    a CPU in seconds) trains; its dry run shows the original's settings."""
    data = write_edm_dataset(tmp_path / 'celeba.zip', random_images(8, 3, 16, seed=2))
    command = ['--outdir', tmp_path / 'runs', '--experiment_name=celeba', '--dump=200', '--cond=0', '--arch=ddpmpp',
               '--precond=ambient', '--cres=1,2,2,2', '--lr=2e-4', '--dropout=0.1', '--augment=0.15', '--data', data,
               '--norm=2', '--max_grad_norm=1.0', '--mask_full_rgb=True', '--corruption_probability=0.4',
               '--delta_probability=0.1', '--batch=256', '--max_size=30000', '--preset=original']
    dry = invoke(command + ['--dry-run'])
    assert dry.exit_code == 0, dry.output
    for setting in ('"gate": "double_sigmoid"', '"hidden_precond": "original"', '"fixed_hat_mask": true',
                    '"augment_dim": 9'):
        assert setting in dry.output, setting
    result = invoke(command + ['--batch=4', '--cbase=8', '--num_blocks=1', '--duration=0.000008', '--workers=0'])
    assert result.exit_code == 0, result.output
    run_dir = glob.glob(str(tmp_path / 'runs' / '*-celeba'))
    assert len(run_dir) == 1 and glob.glob(os.path.join(run_dir[0], 'network-snapshot-*.pt'))


def test_plain_edm_needs_no_delta(tmp_path, data):
    """--precond=edm with --corruption_probability=0 is plain EDM without further options (δ defaults to 0 there);
    the gradient norm is reported without --max_grad_norm."""
    result = invoke(['--outdir', tmp_path / 'run', '--data', data, *TINY, '--precond=edm', '--corruption_probability=0'])
    assert result.exit_code == 0, result.output
    options = json.load(open(tmp_path / 'run' / 'training_options.json'))
    assert options['dataset_kwargs']['delta_probability'] == 0
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert all('Train/grad_norm' in row for row in rows)


@pytest.mark.slow  # an IF fine-tuning run, sampling and a DINOv2 search: about 15 s
def test_the_originals_if_and_neighbours_commands_run(tmp_path, tiny_if):
    """The original README's IF fine-tuning, if_inference and find_dataset_neighbors commands, with paths changed,
    sizes made tiny (resolution, batch, steps, image count) and the model given (the original loaded IF and
    DINOv2 from their hubs)."""
    import find_dataset_neighbors
    import if_inference
    import train_text_to_image
    from test_find_dataset_neighbors import save_tiny_dinov2
    data = write_edm_dataset(tmp_path / 'faces', random_images(8, 3, 16, seed=6))
    out = tmp_path / 'if'
    finetune = ['--resolution=16', '--center_crop', '--random_flip', '--train_batch_size=4',
                '--gradient_accumulation_steps=1', '--max_train_steps=2', '--max_grad_norm=1.0', '--learning_rate=3e-6',
                '--lr_scheduler=constant', '--lr_warmup_steps=0', f'--output_dir={out}', '--validation_prompts',
                'person,', '--report_to=tensorboard', '--corruption_probability=0.5', '--delta_probability=0.1',
                '--use_8bit_adam', '--allow_tf32', '--corruption_pattern=dust', f'--train_data_dir={data}',
                '--empty_text', '--max_train_samples=3000', '--seed=0', '--pretrained_model_name_or_path', tiny_if]
    result = CliRunner().invoke(train_text_to_image.main, finetune)
    assert result.exit_code == 0, result.output
    assert '--center_crop does nothing' in result.output and (out / 'state_dict_2.pt').is_file()
    # The original's --snr_gamma and --validation_epochs (dead there) work: 8 images (16 with flips) in batches
    # of 4 make 4 steps per epoch, so epoch 1 ends at step 4 and validates there, besides the end (step 6).
    args = [a for a in finetune if not a.startswith(('--output_dir', '--max_train_steps'))]
    result = CliRunner().invoke(train_text_to_image.main, args + [f'--output_dir={tmp_path / "snr"}', '--max_train_steps=6',
                                                                  '--snr_gamma=5', '--validation_epochs=1'])
    assert result.exit_code == 0, result.output
    assert {'validation_000004.png', 'validation_000006.png'} <= set(os.listdir(tmp_path / 'snr' / 'artifacts'))

    samples = tmp_path / 'samples'
    result = CliRunner().invoke(if_inference.main, [f'--checkpoint_path={out / "state_dict_2.pt"}',
        f'--output_dir={samples}', '--batch_size=4', '--corruption_probability=0.5',
        '--pretrained_model_name_or_path', tiny_if, '--num_images=4', '--num_inference_steps=2'])
    assert result.exit_code == 0, result.output
    assert len(glob.glob(str(samples / 'images' / '*' / '*.png'))) == 4
    # --layout=original: the original's file names, <batch>_<position>.png.
    result = CliRunner().invoke(if_inference.main, [f'--checkpoint_path={out / "state_dict_2.pt"}',
        f'--output_dir={tmp_path / "original_layout"}', '--batch_size=3', '--corruption_probability=0.5',
        '--pretrained_model_name_or_path', tiny_if, '--num_images=4', '--num_inference_steps=2', '--layout=original'])
    assert result.exit_code == 0, result.output
    assert sorted(f for f in os.listdir(tmp_path / 'original_layout') if f.endswith('.png')) == \
        ['0_0.png', '0_1.png', '0_2.png', '1_0.png']

    model = save_tiny_dinov2(tmp_path / 'dinov2', seed=0)
    result = CliRunner().invoke(find_dataset_neighbors.main, [f'--input_dir={samples / "images"}',
        f'--output_dir={tmp_path / "neighbors"}', f'--data={data}', f'--features_path={tmp_path / "celeba_features.npy"}',
        '--max_size=10000', '--model', model, '--image_size=32', '--workers=0'])
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'neighbors' / 'summary.json').is_file()


def _rows_cols(mask):
    """First and last observed row and column of each sample's mask [N, C, H, W]."""
    rows, cols = mask.amax(1).amax(2) > 0, mask.amax(1).amax(1) > 0
    first = lambda m: m.int().argmax(1)
    last = lambda m: m.shape[1] - 1 - m.flip(1).int().argmax(1)
    return first(rows), last(rows), first(cols), last(cols)


def test_original_mask_geometry():
    """--mask_geometry=original (set by --preset=original) draws the box patterns as the original did."""
    from torch_utils.ambient_diffusion import MaskCorruption
    gen = torch.Generator().manual_seed(0)
    shape = [512, 1, 16, 16]
    # box: B is a box of A's size (ceil(0.25·16) = 4), whatever δ; ours draws it from δ.
    A = MaskCorruption('box', 0.25, 0.9).sample_mask(shape, gen)
    hidden_by_B = lambda hat: (A - hat).flatten(1).sum(1)
    assert (hidden_by_B(MaskCorruption('box', 0.25, 0.9, geometry='original').sample_hat_mask(A, gen)) <= 16).all()
    assert (hidden_by_B(MaskCorruption('box', 0.25, 0.9).sample_hat_mask(A, gen)) > 16).any()
    # fixed_box: A's box starts over {0..H-s-1}, so the last row and column are never hidden; δ only switches B on.
    original = MaskCorruption('fixed_box', 0.25, 0.3, geometry='original')
    A = original.sample_mask(shape, gen)
    assert ((1 - A).flatten(1).sum(1) == 16).all() and (A[..., -1, :] == 1).all() and (A[..., :, -1] == 1).all()
    assert (MaskCorruption('fixed_box', 0.25, 0.3).sample_mask(shape, gen)[..., -1, :] == 0).any()
    hidden = (1 - original.sample_hat_mask(A, gen)).flatten(1).sum(1)
    assert (hidden >= 16).all() and (hidden <= 32).all() and (hidden > 16).any()
    assert torch.equal(MaskCorruption('fixed_box', 0.25, 0.0, geometry='original').sample_hat_mask(A, gen), A)
    # keep_patch: s = 8, s' = 6; the sub-box starts over {0, 1} of A's box, never at 2 (ours: {0, 1, 2}).
    for geometry, max_offset in (('original', 1), ('ours', 2)):
        c = MaskCorruption('keep_patch', 0.5, 0.25, geometry=geometry)
        A = c.sample_mask(shape, gen)
        hat = c.sample_hat_mask(A, gen)
        offsets = _rows_cols(hat)[0] - _rows_cols(A)[0]
        assert offsets.max() == max_offset and offsets.min() == 0
    assert MaskCorruption.from_dict(MaskCorruption('box', 0.2, 0.1, geometry='original').to_dict()).geometry == 'original'
    assert 'geometry' not in MaskCorruption('box', 0.2, 0.1).to_dict()  # older records still compare equal


def test_solve_scores_its_reconstructions_like_the_original(tmp_path, data, snapshot):
    """solve_inverse_problems.py's original scoring options: --ref (FID/IS of the reconstructions), --num, --seed,
    --subdirs, --class/--num_classes (checked against the network)."""
    import eval as eval_cli
    import solve_inverse_problems
    from fixtures import save_tiny_detector
    detector = save_tiny_detector(str(tmp_path / 'detector.pt'), seed=3, feature_dim=8)
    ref = tmp_path / 'ref.npz'
    assert CliRunner().invoke(eval_cli.cli, ['ref', '--data', data, '--dest', ref, '--detector', detector, '--batch=4',
                                             '--workers=0']).exit_code == 0
    out = tmp_path / 'solved'
    args = [f'--network={snapshot}', f'--measurements_path={data}', f'--outdir={out}', '--seeds=0-3', '--steps=2',
            '--corruption_pattern=dust', '--dps_scale=1', '--subdirs', f'--ref={ref}', '--num=3', '--seed=1',
            f'--detector={detector}']
    result = CliRunner().invoke(solve_inverse_problems.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert (out / 'reconstruction' / '000000' / '000003.png').is_file()
    record = json.loads(open(out / 'fid' / 'metrics.jsonl').read())
    assert record['num_images'] == 3 and record['fid'] >= 0 and record['seed'] == 1
    result = CliRunner().invoke(solve_inverse_problems.main, [str(a) for a in args[:6] + ['--num_classes=10']])
    assert result.exit_code != 0 and '--num_classes=10 but' in result.output
    result = CliRunner().invoke(solve_inverse_problems.main, [str(a) for a in args[:6] + ['--num=3']])
    assert result.exit_code != 0 and '--num has no effect' in result.output


def test_dps_in_the_originals_units_takes_the_originals_steps():
    """--guidance_units=original with --norm=batch: x moves by +ζ·g, g = −∇‖y − 𝒜(D_0)‖_F over the whole batch, in
    both Heun stages (the original solve_inverse_problems.py sampler), checked step for step in float64."""
    from training import inverse, samplers
    from torch_utils.ambient_diffusion import RandomInpainting

    torch.manual_seed(1)
    net, zeta = _ToyAmbientNet(), 0.3
    latents = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = (torch.rand(2, 3, 8, 8) > 0.3).double()
    operator = RandomInpainting(0.5)
    params = (torch.rand(2, 3, 8, 8) > 0.5).double()
    y = operator.apply(torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1, params)
    t_steps = samplers.edm_time_steps(3, 0.002, 5, 7)

    def denoise_and_g(x, t):
        x = x.detach().requires_grad_(True)
        D = net(torch.cat([mask * x, mask], 1), t)[:, :3]
        residual = (y - operator.apply(D, params)).flatten()
        return D.detach(), -torch.autograd.grad(residual.norm(), x)[0]

    x = latents * t_steps[0]
    for i in range(3):
        t_hat, t_next = t_steps[i], t_steps[i + 1]
        D, g = denoise_and_g(x, t_hat)
        d1 = (t_next - t_hat) * (x - D) / t_hat + zeta * g
        if i < 2:
            D2, g2 = denoise_and_g(x + d1, t_next)
            x = x + 0.5 * (d1 + (t_next - t_hat) * (x + d1 - D2) / t_next + zeta * g2)
        else:
            x = x + d1
    term = inverse.dps_term(operator, y, params, zeta / math.sqrt(2), norm='batch')  # what solve_batch passes
    ours = samplers.ambient_sampler(net, latents, mask, num_steps=3, sigma_max=5, extra_guidance=[term],
                                    guidance_units='original')
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_every_option_of_every_command_is_read():
    """No option is parsed and ignored: each command's options are read by its module or training/cli.py (as
    opts.<name>, opts['<name>'], opts.get('<name>'), or a parameter of the command function), outside the
    click.option lines that declare them."""
    import re
    import click
    import dataset_tool
    import eval as eval_cli
    import find_dataset_neighbors
    import if_inference
    import solve_inverse_problems
    import train_text_to_image
    from conftest import REPO

    def source(module):
        lines = []
        for path in (module.__file__, os.path.join(REPO, 'training', 'cli.py')):
            lines += [line for line in open(path).read().splitlines()
                      if not line.lstrip().startswith(('@click.option', 'click.option('))]
        return '\n'.join(lines)

    commands = [(train, train.main), (solve_inverse_problems, solve_inverse_problems.main),
                (find_dataset_neighbors, find_dataset_neighbors.main), (train_text_to_image, train_text_to_image.main),
                (if_inference, if_inference.main), (dataset_tool, dataset_tool.main)]
    commands += [(eval_cli, command) for command in eval_cli.cli.commands.values()]
    unread = []
    for module, command in commands:
        text = source(module)
        for param in command.params:
            name = re.escape(param.name)
            read = re.search(rf"\.{name}\b|\[['\"]{name}['\"]\]|get\(['\"]{name}['\"]|def \w+\([^)]*\b{name}\b", text)
            if not read and param.name != 'dry_run':  # dry_run: cli.command_body's own parameter
                unread.append(f'{command.name} --{param.name}')
    assert not unread, unread
    assert len(commands) >= 11 and all(isinstance(c, click.Command) for _, c in commands)


def test_read_weights_takes_legacy_torch_files(tmp_path):
    """A state dict saved in torch's legacy (non-zip) format, which also starts like a pickle, is read."""
    weights = {'model.weight': torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / 'legacy.pt'
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert torch.equal(snapshots.read_weights(path)['model.weight'], weights['model.weight'])


def test_the_originals_eval_refuses_skipping_everything(tmp_path):
    import eval as eval_cli
    result = CliRunner().invoke(eval_cli.cli, ['--network', tmp_path, '--outdir', tmp_path / 'o',
                                               '--skip_generation=True', '--skip_calculation=True'])
    assert result.exit_code != 0 and 'nothing to do' in result.output and 'Traceback' not in result.output


@pytest.mark.slow
def test_a_resumed_transfer_keeps_the_ema_ramp_up_off(tmp_path, data):
    run = tmp_path / 'a'
    assert invoke(['--outdir', run, '--data', data, *TINY]).exit_code == 0
    snapshot = glob.glob(str(run / 'network-snapshot-*.pt'))[-1]
    result = invoke(['--outdir', tmp_path / 'b', '--data', data, *TINY, '--transfer', snapshot, '--seed=5'])
    assert result.exit_code == 0, result.output
    result = invoke(['--outdir', tmp_path / 'b', '--data', data, *TINY, '--duration=0.000016', '--resume', tmp_path / 'b'])
    assert result.exit_code == 0, result.output
    states = sorted(glob.glob(str(tmp_path / 'b' / 'training-state-*.pt')))
    assert all(torch.load(s, weights_only=True)['config'].get('transferred') for s in states)

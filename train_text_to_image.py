"""Fine-tune DeepFloyd IF stage I on corrupted images with the ambient loss (Daras et al. 2023, Sec. 5.2).

    accelerate launch --mixed_precision=no --multi_gpu train_text_to_image.py --train_data_dir=celeba64.zip \
        --resolution=64 --train_batch_size=32 --max_train_steps=15000 --learning_rate=3e-6 --lr_warmup_steps=0 \
        --use_8bit_adam --allow_tf32 --corruption_probability=0.8 --delta_probability=0.1 --empty_text \
        --max_train_samples=3000 --output_dir=runs/if-celeba-p0.8
    python train_text_to_image.py --pretrained_model_name_or_path=path/to/IF-I-tiny --train_data_dir=data.zip ...

The UNet sees Ã ⊙ x_t and is trained on the pixels of A only (`training.ambient_if`); hidden pixels never reach
the input or the loss. `--train_data_dir` reads an EDM-format dataset (dataset_tool.py) whose masks A are
fixed per image; `--dataset_name` reads a 🤗 dataset (hub id, saved dataset or image folder) with captions.
The further corruption B is redrawn every step from (seed, step, process) unless `--fixed_hat_mask`.

Outputs in --output_dir: `checkpoint-{step}/` (accelerate state: UNet, optimizer, LR schedule, EMA, RNG),
`state_dict_{step}.pt` (UNet weights after `step` optimizer updates, EMA weights with --use_ema, no wrapper
prefixes; if_inference.py loads them), `stats.jsonl` (loss and diagnostics per step), `artifacts/` (grids of the
data, masks, noisy inputs and predictions; validation samples), `training_options.json`, tracker logs.
"""

import json
import math
import os
import re
import shutil
import time

import click
import torch
import tqdm

import dnnlib
from torch_utils.ambient_diffusion import MASK_PATTERNS, MaskCorruption
from torch_utils.images import save_image_grid
from torch_utils.misc import seeded_generator
from training import ambient_if
from training.cli import check_output_dir, given_options, one_line_errors, refuse_ignored
from training.dataset import DatasetError, HFImageDataset, ImageFolderDataset
from training.snapshots import atomic_torch_save

LR_SCHEDULERS = ['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup']


class TrainingItems(torch.utils.data.Dataset):
    """Dict items for the DataLoader: observation (A ⊙ x0, or x0 for clean diagnostics), A, fixed Ã, caption."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        image, _label, mask, hat = self.dataset[idx]
        if image.shape[0] == 1:  # Grayscale (e.g. MRI) datasets feed IF's RGB UNet with repeated channels.
            image, mask, hat = (t.repeat(3, 1, 1) for t in (image, mask, hat))
        caption = self.dataset.caption(idx) if hasattr(self.dataset, 'caption') else ''
        return dict(image=image, mask=mask, hat_mask=hat, caption=caption)


def make_dataset(c):
    """The training dataset named by the options (EDM-format folder/zip or 🤗 dataset)."""
    mode = 'clean' if c.clean_diagnostics else 'corrupted'
    common = dict(max_size=c.max_train_samples, xflip=c.random_flip, random_seed=c.seed,
        corruption_pattern=c.corruption_pattern, corruption_probability=c.corruption_probability,
        delta_probability=c.delta_probability, mask_full_rgb=True, corruption_seed=c.corruption_seed, hat_seed=c.seed,
        fixed_hat_mask=c.fixed_hat_mask, mode=mode)
    if c.train_data_dir is not None:
        dataset = ImageFolderDataset(c.train_data_dir, **common)
        if dataset.resolution != c.resolution:
            raise DatasetError(f'{c.train_data_dir} holds {dataset.resolution}x{dataset.resolution} images but '
                               f'--resolution={c.resolution}: rebuild it with dataset_tool.py '
                               f'--resolution={c.resolution}x{c.resolution} or pass --resolution={dataset.resolution}')
        return dataset
    return HFImageDataset(c.dataset_name, c.dataset_config_name, image_column=c.image_column,
        caption_column=None if c.empty_text else c.caption_column, resolution=c.resolution,
        center_crop=c.center_crop, cache_dir=c.cache_dir, **common)


def step_generator(seed, step, micro_step, process):
    """The generator of one micro-batch's noise, timesteps and B: a function of the run, not of RNG history."""
    return seeded_generator(seed, step, micro_step, process, 0x1F)


def checkpoint_dirs(output_dir):
    """Existing `checkpoint-{step}` folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r'checkpoint-(\d+)', d)))
    return [os.path.join(output_dir, f'checkpoint-{s}') for s in steps]


def resolve_resume(c):
    """The checkpoint folder to resume from, or None."""
    if c.resume_from_checkpoint is None:
        return None
    if c.resume_from_checkpoint == 'latest':
        found = checkpoint_dirs(c.output_dir)
        if not found:
            print(f'No checkpoint in {c.output_dir}; starting a new run.')
            return None
        return found[-1]
    path = c.resume_from_checkpoint
    if not re.fullmatch(r'checkpoint-\d+', os.path.basename(path.rstrip('/'))) or not os.path.isdir(path):
        raise ValueError(f'--resume_from_checkpoint={path} is not a checkpoint-<step> folder written by this script '
                         f'(or pass "latest")')
    return path


def ema_weights(unet, ema):
    """The UNet state dict (CPU copies), with the EMA's shadow parameters in place of the parameters."""
    state = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    if ema is not None:
        for (name, _), shadow in zip(unet.named_parameters(), ema.shadow_params):
            state[name] = shadow.detach().cpu().clone()
    return state


def save_artifacts(c, batch, pics, step):
    """Grids of the data the step saw, its masks, the UNet input and the predicted x̂0."""
    folder = os.path.join(c.output_dir, 'artifacts')
    os.makedirs(folder, exist_ok=True)
    observed = batch['image'] * batch['mask']
    grids = dict(observed=observed, hat_observed=observed * batch['hat_mask'], masks=batch['mask'] * 2 - 1,
                 hat_masks=batch['hat_mask'] * 2 - 1)
    if c.clean_diagnostics:
        grids['clean'] = batch['image']
    grids[f'noisy_inputs_{step:06d}'] = pics['noisy_input']
    grids[f'predictions_{step:06d}'] = pics['prediction'].clamp(-1, 1)
    for name, images in grids.items():
        save_image_grid(images.float().cpu(), os.path.join(folder, f'{name}.png'))


def run_validation(c, accelerator, unet, ema, scheduler, validation_embeds, step):
    """Sample one image per validation prompt with the ambient pipeline; save a grid, log it."""
    from pipeline_if import AmbientIFPipeline
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    pipe = AmbientIFPipeline(tokenizer=None, text_encoder=None, unet=model, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n = validation_embeds.shape[0]
    generator = [torch.Generator().manual_seed(c.seed + i) for i in range(n)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = pipe(prompt_embeds=validation_embeds.to(accelerator.device, model.dtype), guidance_scale=0.0,
            num_inference_steps=c.validation_inference_steps, generator=generator, output_type='pt',
            corruption_pattern=c.corruption_pattern, corruption_probability=c.corruption_probability,
            delta_probability=c.delta_probability).images
    model.train(was_training)
    if ema is not None:
        ema.restore(model.parameters())
    path = os.path.join(c.output_dir, 'artifacts', f'validation_{step:06d}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image_grid(images.float().cpu(), path)
    pictures = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for tracker in accelerator.trackers:
        if tracker.name == 'tensorboard':
            tracker.writer.add_images('validation', pictures, step, dataformats='NHWC')
        elif tracker.name == 'wandb':
            import wandb
            tracker.log({'validation': [wandb.Image(p, caption=t) for p, t in zip(pictures, c.validation_prompts)]},
                        step=step)


def make_optimizer(c, params, lr):
    kwargs = dict(lr=lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
    if not c.use_8bit_adam:
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kwargs)
    except Exception as err:  # ImportError, or a library that cannot load on this platform
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f'--use_8bit_adam needs a working bitsandbytes (pip install bitsandbytes): {reason}; '
                         f'train without --use_8bit_adam') from None


def save_checkpoint(c, accelerator, step):
    """accelerator.save_state into checkpoint-{step}, written under a temporary name and renamed when complete."""
    final = os.path.join(c.output_dir, f'checkpoint-{step}')
    tmp = final + '.tmp'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if c.checkpoints_total_limit is not None:  # Only once the new one is complete.
            old = [d for d in checkpoint_dirs(c.output_dir) if d != final]
            for d in old[:max(0, len(old) - c.checkpoints_total_limit + 1)]:
                shutil.rmtree(d)
    accelerator.wait_for_everyone()


def make_accelerator(c):
    """The Accelerator of the run; seeds shuffling and dropout and writes training_options.json."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    if c.mixed_precision == 'fp16' and not torch.cuda.is_available():
        raise ValueError('--mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU')
    accelerator = Accelerator(gradient_accumulation_steps=c.gradient_accumulation_steps,
        mixed_precision=c.mixed_precision, log_with=None if c.report_to == 'none' else c.report_to,
        project_config=ProjectConfiguration(project_dir=c.output_dir, logging_dir=os.path.join(c.output_dir, c.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=c.seed))
    set_seed(c.seed)  # DataLoader shuffling and dropout; noise, timesteps and masks use explicit generators.
    if c.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(c.output_dir, exist_ok=True)
        with dnnlib.util.atomic_write(os.path.join(c.output_dir, 'training_options.json'), 'w') as f:
            json.dump(c, f, indent=2)
    return accelerator


def load_models(c, accelerator):
    """(IF scheduler, UNet in training mode, EMA or None). The UNet trains in float32; accelerate autocasts."""
    from diffusers.training_utils import EMAModel

    scheduler = ambient_if.load_scheduler(c.pretrained_model_name_or_path, c.cache_dir)
    unet = ambient_if.load_unet(c.pretrained_model_name_or_path, c.cache_dir, c.variant)
    unet.train()
    if c.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if c.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:
            raise ValueError(f'--enable_xformers_memory_efficient_attention failed ({str(err).splitlines()[0]}); '
                             f'install xformers or leave the option out') from None
    ema = None
    if c.use_ema:
        ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    return scheduler, unet, ema


def load_text_conditioning(c, accelerator, unet):
    """(tokenizer, encoder, empty-prompt embedding, validation prompt embeddings or None).

    The tokenizer and encoder are None unless training uses captions; the main process computes (and caches)
    the empty-prompt embedding before the others read it.
    """
    captions = c.dataset_name is not None and not c.empty_text and c.caption_column is not None
    tokenizer = encoder = None
    main = accelerator.is_main_process
    empty = ambient_if.empty_prompt_embeds(c.empty_embeds, c.pretrained_model_name_or_path, c.cache_dir,
                                           device=accelerator.device, in_8bit=c.text_encoder_8bit) if main else None
    accelerator.wait_for_everyone()
    if not main:
        empty = ambient_if.empty_prompt_embeds(c.empty_embeds, c.pretrained_model_name_or_path, c.cache_dir,
                                               device=accelerator.device, in_8bit=c.text_encoder_8bit)
    ambient_if.check_embeds(empty, unet, c.empty_embeds)
    empty = empty.to(accelerator.device)
    validation_embeds = None
    if captions or any(p for p in c.validation_prompts):
        tokenizer, encoder = ambient_if.load_text_encoder(c.pretrained_model_name_or_path, c.cache_dir,
            dtype=ambient_if.text_encoder_dtype(accelerator.device), in_8bit=c.text_encoder_8bit)
        if not c.text_encoder_8bit:  # an 8-bit model is placed on the GPU when it loads
            encoder.to(accelerator.device)
    if c.validation_prompts:
        validation_embeds = torch.cat([empty if not p else ambient_if.encode_prompts(tokenizer, encoder, [p]).float()
                                       for p in c.validation_prompts])
    if not captions:
        tokenizer = encoder = None  # Only the empty prompt is used in training.
    return tokenizer, encoder, empty, validation_embeds


def prepare_optimization(c, accelerator, unet, dataset):
    """DataLoader, optimizer and LR schedule, prepared with the UNet by accelerate, and the run's step counts."""
    from diffusers.optimization import get_scheduler

    loader = torch.utils.data.DataLoader(TrainingItems(dataset), batch_size=c.train_batch_size, shuffle=True,
        num_workers=c.dataloader_num_workers, drop_last=False)
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / c.gradient_accumulation_steps)
    max_steps = c.max_train_steps or c.num_train_epochs * updates_per_epoch
    lr = c.learning_rate
    if c.scale_lr:
        lr *= c.gradient_accumulation_steps * c.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(c, unet.parameters(), lr)
    lr_scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=c.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    return dnnlib.EasyDict(unet=unet, optimizer=optimizer, loader=loader, lr_scheduler=lr_scheduler,
        updates_per_epoch=updates_per_epoch, max_steps=max_steps, epochs=math.ceil(max_steps / updates_per_epoch))


def resume(c, accelerator, ema):
    """Load the checkpoint named by --resume_from_checkpoint, if any; returns its step (0 for a new run)."""
    path = resolve_resume(c)
    if path is None:
        return 0
    accelerator.print(f'Resuming from {path}')
    accelerator.load_state(path)
    if ema is not None:
        ema.to(accelerator.device)  # accelerate loads custom states onto the CPU.
    return int(path.rstrip('/').rsplit('-', 1)[1])


def truncate_stats(path, step):
    """Drop the stats.jsonl lines of steps after `step` (written after the checkpoint a run resumes from)."""
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
        with dnnlib.util.atomic_write(path, 'w') as f:
            f.writelines(kept)


def train_micro_batch(c, run, batch, step, micro):
    """Forward and backward pass of one micro-batch, and the optimizer update when gradients sync.

    Noise, timesteps and B come from `step_generator(seed, step, micro-step, process)`. Sets batch['hat_mask'] to
    the Ã used; returns (diagnostics, tensors for pictures).
    """
    accelerator = run.accelerator
    with accelerator.accumulate(run.unet):
        generator = step_generator(c.seed, step, micro % c.gradient_accumulation_steps, accelerator.process_index)
        mask = batch['mask']
        hat = batch['hat_mask'] if c.fixed_hat_mask else run.corruption.sample_hat_mask(mask, generator=generator)
        batch['hat_mask'] = hat
        if run.encoder is not None:
            embeds = ambient_if.encode_prompts(run.tokenizer, run.encoder, batch['caption'])
        else:
            embeds = run.empty.expand(mask.shape[0], -1, -1)
        clean = batch['image'] if c.clean_diagnostics else None
        with accelerator.autocast():
            loss, stats, pics = ambient_if.ambient_if_step(run.unet, run.scheduler, batch['image'], mask, hat,
                embeds.float(), generator=generator, noise_offset=c.noise_offset, clean=clean, snr_gamma=c.snr_gamma)
        accelerator.backward(loss)
        if accelerator.sync_gradients and c.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.unet.parameters(), c.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return stats, pics


def log_step(c, run, window, step, epoch, start, progress):
    """Log one optimizer step: the diagnostics summed in `window`, averaged over micro-batches and processes."""
    accelerator = run.accelerator
    count = window.pop('micro_batches')
    names = sorted(window)
    values = accelerator.reduce(torch.stack([window[k] / count for k in names]), reduction='mean')
    line = dict(step=step, epoch=epoch, lr=run.lr_scheduler.get_last_lr()[0],
                **{k: float(v) for k, v in zip(names, values)}, sec=time.time() - start)
    accelerator.log({k: v for k, v in line.items() if k != 'step'}, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(c.output_dir, 'stats.jsonl'), 'a') as f:
            f.write(json.dumps(line) + '\n')
        progress.update(1)
        progress.set_postfix(loss=f'{line["loss"]:.4f}', loss_hat=f'{line["loss_hat"]:.4f}')


def save_and_validate(c, run, step, done):
    """The checkpoint, state dict and validation samples due after `step` optimizer updates (all at the end)."""
    accelerator = run.accelerator
    main = accelerator.is_main_process
    if step % c.checkpointing_steps == 0 or done:
        save_checkpoint(c, accelerator, step)
    if main and (step % c.state_dict_steps == 0 or done):
        atomic_torch_save(ema_weights(accelerator.unwrap_model(run.unet), run.ema),
                          os.path.join(c.output_dir, f'state_dict_{step}.pt'))
    epoch_end = step % run.updates_per_epoch == 0
    due = step % c.validation_steps == 0 or done or (
        c.validation_epochs is not None and epoch_end and (step // run.updates_per_epoch) % c.validation_epochs == 0)
    if main and run.validation_embeds is not None and due:
        run_validation(c, accelerator, run.unet, run.ema, run.validation_scheduler, run.validation_embeds, step)


def train_steps(c, run, global_step, start):
    """Optimizer steps from `global_step` to `run.max_steps`; returns the last step.

    A resumed run skips the batches its checkpoint already saw. `start` is the time stats.jsonl's `sec` counts from.
    """
    accelerator = run.accelerator
    first_epoch = global_step // run.updates_per_epoch
    skip_batches = (global_step % run.updates_per_epoch) * c.gradient_accumulation_steps
    window = {}  # Diagnostics summed over the micro-batches of one optimizer step.
    progress = tqdm.tqdm(total=run.max_steps, initial=global_step, disable=not accelerator.is_main_process, desc='steps')
    for epoch in range(first_epoch, run.epochs):
        if global_step >= run.max_steps:
            break
        run.loader.set_epoch(epoch)
        batches = run.loader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(run.loader, skip_batches)
        for micro, batch in enumerate(batches):
            stats, pics = train_micro_batch(c, run, batch, global_step, micro)
            for k, v in stats.items():
                window[k] = window.get(k, 0) + v.float()
            window['micro_batches'] = window.get('micro_batches', 0) + 1
            if accelerator.is_main_process and micro == 0:  # What the first step of each epoch saw.
                save_artifacts(c, batch, pics, global_step)
            if not accelerator.sync_gradients:
                continue
            if run.ema is not None:
                run.ema.step(run.unet.parameters())
            global_step += 1
            log_step(c, run, window, global_step, epoch, start, progress)
            window = {}
            done = global_step >= run.max_steps
            save_and_validate(c, run, global_step, done)
            if done:
                break
    progress.close()
    return global_step


def train(c):
    """The training run described by the config `c` (see the click options)."""
    from diffusers import DDPMScheduler

    accelerator = make_accelerator(c)
    run = dnnlib.EasyDict(accelerator=accelerator)  # What the training steps use.
    run.scheduler, unet, run.ema = load_models(c, accelerator)
    dataset = make_dataset(c)
    run.tokenizer, run.encoder, run.empty, run.validation_embeds = load_text_conditioning(c, accelerator, unet)
    accelerator.print(f'Dataset: {len(dataset)} images of {dataset.image_shape}, {dataset.corruption}, '
                      f'{"captions" if run.encoder is not None else "empty prompt"}')
    run.update(prepare_optimization(c, accelerator, unet, dataset))
    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in c.items()}
        accelerator.init_trackers(c.tracker_project_name, config=config)
    global_step = resume(c, accelerator, run.ema)
    # Validation samples as if_inference.py does by default: posterior variance (the variance channels are not trained).
    run.validation_scheduler = DDPMScheduler.from_config(run.scheduler.config, variance_type='fixed_small')
    run.corruption = MaskCorruption(c.corruption_pattern, c.corruption_probability, c.delta_probability,
                                    mask_full_rgb=True)
    accelerator.print(f'{run.max_steps} optimizer steps of {c.train_batch_size} x {accelerator.num_processes} '
                      f'processes x {c.gradient_accumulation_steps} accumulation; {run.epochs} epochs; '
                      f'starting at step {global_step}')
    if accelerator.is_main_process:
        truncate_stats(os.path.join(c.output_dir, 'stats.jsonl'), global_step)
    start = time.time()
    global_step = train_steps(c, run, global_step, start)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f'Done: {global_step} steps in {time.time() - start:.1f} s; outputs in {c.output_dir}')


@click.command()
# Model and data.
@click.option('--pretrained_model_name_or_path', help='IF stage-I model: hub id or local directory', metavar='ID|DIR', type=str, default=ambient_if.IF_STAGE_I, show_default=True)
@click.option('--variant',            help='Weight variant to load (e.g. fp16)', metavar='STR', type=str)
@click.option('--cache_dir',          help='Cache of hub models and datasets', metavar='DIR', type=str)
@click.option('--train_data_dir',     help='EDM-format dataset folder or zip (dataset_tool.py)', metavar='PATH', type=str)
@click.option('--dataset_name',       help='🤗 dataset: hub id, dataset repository folder, or image folder', metavar='ID|DIR', type=str)
@click.option('--dataset_config_name', help='The 🤗 dataset\'s configuration', metavar='STR', type=str)
@click.option('--image_column',       help='Image column of the 🤗 dataset', metavar='STR', type=str, default='image', show_default=True)
@click.option('--caption_column',     help='Caption column of the 🤗 dataset', metavar='STR', type=str, default='text', show_default=True)
@click.option('--empty_text',         help='Train with the empty prompt instead of captions', is_flag=True)
@click.option('--empty_embeds',       help='Empty-prompt T5 embedding: used if it exists, else computed and saved [default: OUTPUT_DIR/empty_embeds.pt]', metavar='PT', type=str)
@click.option('--max_train_samples',  help='Train on a seeded random subset of this many images', metavar='INT', type=click.IntRange(min=1))
@click.option('--resolution',         help='Image side (datasets are resized and cropped to it; folders must match)', metavar='INT', type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--center_crop',        help='Crop 🤗 images at the centre (default: a random square fixed per image)', is_flag=True)
@click.option('--random_flip',        help='Add mirrored copies of the images (masks mirrored with them)', is_flag=True)
# Corruption.
@click.option('--corruption_pattern', help='Mask pattern of A', type=click.Choice(list(MASK_PATTERNS)), default='dust', show_default=True)
@click.option('--corruption_probability', help='p: fraction of pixels A hides', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.4, show_default=True)
@click.option('--delta_probability',  help='δ: fraction of A the further corruption B hides', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option('--corruption_seed',    help='Seed of the dataset\'s masks A (the corrupted dataset itself)', metavar='INT', type=int, default=0, show_default=True)
@click.option('--fixed_hat_mask',     help='One fixed B per image (the original) instead of a fresh B every step', is_flag=True)
@click.option('--clean_diagnostics',  help='Read clean images to log the loss on all and on hidden pixels (evaluation only; training still sees A ⊙ x0)', is_flag=True)
# Optimisation.
@click.option('--output_dir',         help='Where checkpoints, state dicts and logs go', metavar='DIR', type=str, default='if-ambient-finetuned', show_default=True)
@click.option('--seed',               help='Seed of B, noise, timesteps, shuffling, crops and subsets', metavar='INT', type=int, default=0, show_default=True)
@click.option('--train_batch_size',   help='Batch size per process', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--num_train_epochs',   help='Epochs (when --max_train_steps is not given)', metavar='INT', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--max_train_steps',    help='Optimizer steps in total (overrides the epochs)', metavar='INT', type=click.IntRange(min=1))
@click.option('--gradient_accumulation_steps', help='Micro-batches per optimizer step', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--gradient_checkpointing', help='Recompute UNet activations in the backward pass (less memory)', is_flag=True)
@click.option('--learning_rate',      help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option('--scale_lr',           help='Multiply the LR by accumulation x batch x processes', is_flag=True)
@click.option('--lr_scheduler',       help='LR schedule', type=click.Choice(LR_SCHEDULERS), default='constant', show_default=True)
@click.option('--lr_warmup_steps',    help='LR warm-up in optimizer steps', metavar='INT', type=click.IntRange(min=0), default=500, show_default=True)
@click.option('--push_to_hub', '--hub_token', '--hub_model_id', 'hub', help='The original\'s hub upload: refused, with what to run instead', hidden=True, is_flag=False, flag_value='yes', type=str)
@click.option('--local_rank',         help='Set by old launchers; must agree with LOCAL_RANK', hidden=True, type=int)
@click.option('--text_encoder_8bit',  help='Load T5 in 8 bits (bitsandbytes; CUDA only), as the original did', is_flag=True)
@click.option('--use_8bit_adam',      help='8-bit AdamW from bitsandbytes', is_flag=True)
@click.option('--allow_tf32',         help='Allow TF32 matmuls and convolutions on Ampere+ GPUs (no effect on CPU)', is_flag=True)
@click.option('--use_ema',            help='Keep an EMA of the UNet; state dicts hold the EMA weights', is_flag=True)
@click.option('--dataloader_num_workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--adam_beta1',         help='AdamW β1', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.9, show_default=True)
@click.option('--adam_beta2',         help='AdamW β2', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.999, show_default=True)
@click.option('--adam_weight_decay',  help='AdamW weight decay', metavar='FLOAT', type=click.FloatRange(min=0), default=1e-2, show_default=True)
@click.option('--adam_epsilon',       help='AdamW ε', metavar='FLOAT', type=click.FloatRange(min=0), default=1e-8, show_default=True)
@click.option('--max_grad_norm',      help='Clip the global gradient norm (0 = off)', metavar='FLOAT', type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option('--noise_offset',       help='Offset noise: ε += offset · N(0, 1) per image and channel', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--mixed_precision',    help='Mixed precision (default: accelerate\'s config)', type=click.Choice(['no', 'fp16', 'bf16']))
@click.option('--enable_xformers_memory_efficient_attention', help='xformers attention in the UNet', is_flag=True)
# Checkpoints, logging, validation.
@click.option('--checkpointing_steps', help='Save accelerate state every N optimizer steps', metavar='INT', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--checkpoints_total_limit', help='Keep at most this many checkpoints', metavar='INT', type=click.IntRange(min=1))
@click.option('--resume_from_checkpoint', help='checkpoint-<step> folder, or "latest" in --output_dir', metavar='DIR|latest', type=str)
@click.option('--state_dict_steps',   help='Save state_dict_{step}.pt every N optimizer steps', metavar='INT', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--validation_prompts', help='Comma-separated prompts sampled at validation (empty entries: the empty prompt)', metavar='STR', type=str)
@click.option('--validation_epochs',  help='Also validate at the end of every N epochs', metavar='INT', type=click.IntRange(min=1))
@click.option('--snr_gamma',          help='Min-SNR weighting (Hang et al. 2023): each sample\'s loss on x̂0 times min(SNR_t, γ)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--validation_steps',   help='Validate every N optimizer steps', metavar='INT', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--validation_inference_steps', help='DDPM steps of validation sampling', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--report_to',          help='Tracker', type=click.Choice(['tensorboard', 'wandb', 'all', 'none']), default='tensorboard', show_default=True)
@click.option('--logging_dir',        help='Tracker folder under --output_dir', metavar='DIR', type=str, default='logs', show_default=True)
@click.option('--tracker_project_name', help='Tracker project', metavar='STR', type=str, default='text2image-fine-tune', show_default=True)
@click.option('--dry_run',            help='Print the resolved options and exit', is_flag=True)
def main(**kwargs):
    """Fine-tune DeepFloyd IF stage I on corrupted data with the ambient loss."""
    c = dnnlib.EasyDict(kwargs)
    if c.hub is not None:
        raise click.UsageError('uploading to the Hugging Face hub is not part of training here: when it ends, run '
                               '`huggingface-cli upload <repo id> <output_dir>/state_dict_<step>.pt`')
    if c.local_rank is not None and str(c.local_rank) != os.environ.get('LOCAL_RANK', str(c.local_rank)):
        raise click.UsageError(f'--local_rank={c.local_rank} disagrees with LOCAL_RANK={os.environ["LOCAL_RANK"]}')
    if (c.train_data_dir is None) == (c.dataset_name is None):
        raise click.ClickException('pass exactly one of --train_data_dir (EDM-format folder or zip) and --dataset_name')
    if c.train_data_dir is not None:
        refuse_ignored(given_options(), [(name, True, 'it applies to --dataset_name (a 🤗 dataset), not --train_data_dir')
                                         for name in ('dataset_config_name', 'image_column', 'caption_column')])
        if c.center_crop:  # the original's README passes it with a local folder, where it never did anything
            print('Note: --center_crop does nothing for --train_data_dir datasets, which are square already '
                  '(dataset_tool.py --transform=center-crop crops them); going on without it')
            c.center_crop = False
    refuse_ignored(given_options(), [(name, not c.validation_prompts, 'there is no validation without --validation_prompts')
                                     for name in ('validation_epochs', 'validation_steps')])
    if c.empty_embeds is None:
        c.empty_embeds = os.path.join(c.output_dir, 'empty_embeds.pt')
    c.validation_prompts = [p.strip() for p in c.validation_prompts.split(',')] if c.validation_prompts else []
    if c.dry_run:
        print(json.dumps(c, indent=2))
        return
    with one_line_errors():
        check_output_dir(c.output_dir, '--output_dir')
        train(c)


if __name__ == '__main__':
    main()

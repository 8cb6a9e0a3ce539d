"""Sample a DeepFloyd IF model fine-tuned on corrupted data (ambient IF pipeline), optionally upscaled by IF stage II.

    python if_inference.py --checkpoint_path=runs/if-celeba-p0.8/state_dict_15000.pt --output_dir=out/if-p0.8 \
        --corruption_probability=0.8 --num_images=50000 --batch_size=16
    python if_inference.py --pretrained_model_name_or_path=path/to/IF-I-tiny --checkpoint_path=... --upscale \
        --upscaler_model=path/to/IF-II-tiny ...

Image i is `{output_dir}/images/{i - i % 1000:06d}/{i:06d}.png`, drawn from its own generator (seed + i): its
initial noise, its fixed sampling mask and its DDPM noise do not depend on the batch size, so a rerun (or a
--batch_resume_index) skips finished images and regenerates nothing. `--upscale` also writes IF stage-II
outputs to `upscaled/`. The defaults reproduce the original's sampling: empty prompt, no classifier-free
guidance, 100 DDPM steps, posterior-variance noise (`--variance_type=fixed_small`), dynamic thresholding.
Checkpoints are `state_dict_{step}.pt` from train_text_to_image.py or the original's (`_orig_mod.module.` prefixes
are removed). fp16 on CUDA, fp32 on CPU.
"""

import json
import math
import os

import click
import torch
import tqdm
from diffusers import DDPMScheduler
import dnnlib
from training.cli import check_output_dir, image_path, one_line_errors
from pipeline_if import CORRUPTION_PATTERNS, AmbientIFPipeline
from torch_utils.images import save_image_grid, save_png, to_uint8
from training import ambient_if

VARIANCE_TYPES = ('fixed_small', 'learned_range')
UPSCALE_SEED_OFFSET = 1 << 32  # Stage II of image i draws from seed + i + offset, independent of stage I's noise.
# Options that change the images: a rerun into the same folder must use the same values.
IMAGE_OPTIONS = ('pretrained_model_name_or_path', 'checkpoint_path', 'corruption_pattern', 'corruption_probability',
                 'delta_probability', 'seed', 'num_inference_steps', 'guidance_scale', 'prompt', 'variance_type',
                 'upscale', 'upscaler_model', 'upscale_steps', 'noise_level', 'variant')


def prompt_embeddings(c, device):
    """(prompt embeddings [1, L, D], negative = empty-prompt embeddings [1, L, D]) on `device`."""
    empty = ambient_if.empty_prompt_embeds(c.empty_embeds, c.pretrained_model_name_or_path, c.cache_dir, device,
                                           in_8bit=c.text_encoder_8bit)
    if not c.prompt:
        return empty.to(device), empty.to(device)
    tokenizer, encoder = ambient_if.load_text_encoder(c.pretrained_model_name_or_path, c.cache_dir,
                                                      dtype=ambient_if.text_encoder_dtype(device), in_8bit=c.text_encoder_8bit)
    embeds = ambient_if.encode_prompts(tokenizer, encoder if c.text_encoder_8bit else encoder.to(device), [c.prompt]).float()
    return embeds, empty.to(device)


def load_pipelines(c, device, dtype):
    """The ambient stage-I pipeline (fine-tuned UNet, chosen variance) and, with --upscale, IF stage II."""
    common = dict(text_encoder=None, tokenizer=None, safety_checker=None, watermarker=None, feature_extractor=None,
                  requires_safety_checker=False, dtype=dtype, variant=c.variant, cache_dir=c.cache_dir)
    pipe = ambient_if.load_component('IF stage-I pipeline', AmbientIFPipeline.from_pretrained,
                                     c.pretrained_model_name_or_path, '--pretrained_model_name_or_path', **common)
    if c.checkpoint_path is not None:
        ambient_if.load_unet_state_dict(pipe.unet, c.checkpoint_path)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type=c.variance_type)
    pipe.to(device)
    upscaler = None
    if c.upscale:
        from diffusers import IFSuperResolutionPipeline
        upscaler = ambient_if.load_component('IF stage-II pipeline', IFSuperResolutionPipeline.from_pretrained,
                                             c.upscaler_model, '--upscaler_model', **common)
        upscaler.to(device)
        upscaler.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, upscaler


def check_options(c):
    """Write inference_options.json, or refuse to add images made with other options to an existing folder."""
    path = os.path.join(c.output_dir, 'inference_options.json')
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        old.setdefault('layout', 'ours')  # folders written before --layout existed
        keys = IMAGE_OPTIONS + ('layout',) + (('batch_size',) if c.layout == 'original' else ())  # names hold the batch
        changed = [f'--{k}: {old.get(k)!r} -> {c[k]!r}' for k in keys if old.get(k) != c[k]]
        if changed:
            raise ValueError(f'{c.output_dir} holds images made with other options ({"; ".join(changed)}); '
                             f'pass another --output_dir')
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(c, f, indent=2)


def _image_file(c, name, index):
    """Where image `index` goes: images/<thousands>/<index>.png (ours) or, with --layout=original, the original's
    <batch>_<position>.png next to each other (`_super_res` for the upscaled ones)."""
    if c.layout == 'original':
        b, j = divmod(index, c.batch_size)
        return os.path.join(c.output_dir, f'{b}_{j}{"_super_res" if name == "upscaled" else ""}.png')
    return image_path(os.path.join(c.output_dir, name), index, subdirs=True)


def _collage_path(c, name, batch_index):
    return os.path.join(c.output_dir, 'collages', f'{name}_{batch_index:06d}.png')


def generate(c):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    pipe, upscaler = load_pipelines(c, device, dtype)  # bad models and checkpoints fail before anything is written
    os.makedirs(c.output_dir, exist_ok=True)
    embeds, negative = prompt_embeddings(c, device)
    ambient_if.check_embeds(embeds, pipe.unet, c.empty_embeds if not c.prompt else '--prompt')
    check_options(c)

    names = ('images', 'upscaled')
    num_batches = math.ceil(c.num_images / c.batch_size)
    done = skipped = 0
    for b in tqdm.tqdm(range(c.batch_resume_index, num_batches), desc='batches'):
        batch = range(b * c.batch_size, min((b + 1) * c.batch_size, c.num_images))
        wanted = names[:2 if upscaler is not None else 1]
        # Per-image generators: only the missing images of a batch are made, and they come out the same.
        indices = [i for i in batch if not all(os.path.isfile(_image_file(c, name, i)) for name in wanted)]
        if not c.save_separate:  # only collages: a batch is done when its collages are there
            collages = [_collage_path(c, name, b) for name in ('images', 'upscaled')[:len(wanted)]]
            indices = [] if all(os.path.isfile(p) for p in collages) else list(batch)
        skipped += len(batch) - len(indices)
        if not indices:
            continue
        n = len(indices)
        kwargs = dict(prompt_embeds=embeds.expand(n, -1, -1).to(dtype), guidance_scale=c.guidance_scale)
        if c.guidance_scale > 1:
            kwargs['negative_prompt_embeds'] = negative.expand(n, -1, -1).to(dtype)
        images = pipe(num_inference_steps=c.num_inference_steps, output_type='pt',
                      generator=[torch.Generator(device).manual_seed(c.seed + i) for i in indices],
                      corruption_pattern=c.corruption_pattern, corruption_probability=c.corruption_probability,
                      delta_probability=c.delta_probability, **kwargs).images
        outputs = dict(images=images)
        if upscaler is not None:
            outputs['upscaled'] = upscaler(image=images, num_inference_steps=c.upscale_steps, noise_level=c.noise_level,
                output_type='pt', generator=[torch.Generator(device).manual_seed(c.seed + i + UPSCALE_SEED_OFFSET)
                                             for i in indices], **kwargs).images
        for name, batch in outputs.items():
            if c.save_separate:
                for i, image in zip(indices, to_uint8(batch.float().cpu())):  # [N, H, W, C]
                    save_png(image, _image_file(c, name, i))
            if c.save_collage:
                save_image_grid(batch.float().cpu(), _collage_path(c, name, b))
        done += n
    print(f'Generated {done} images ({skipped} already there) in {c.output_dir}')


@click.command()
@click.option('--pretrained_model_name_or_path', help='IF stage-I model: hub id or local directory', metavar='ID|DIR', type=str, default=ambient_if.IF_STAGE_I, show_default=True)
@click.option('--checkpoint_path',    help='Fine-tuned UNet state_dict_*.pt [default: the pretrained UNet]', metavar='PT', type=str)
@click.option('--output_dir',         help='Where images go', metavar='DIR', type=str, required=True)
@click.option('--batch_size',         help='Images per pipeline call', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--num_images',         help='Number of images', metavar='INT', type=click.IntRange(min=1), default=50000, show_default=True)
@click.option('--batch_resume_index', help='Start at this batch (earlier ones are skipped)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--text_encoder_8bit',  help='Load T5 in 8 bits (bitsandbytes; CUDA only), as the original did', is_flag=True)
@click.option('--save_collage',       help='Also save a grid per batch under collages/', is_flag=True)
@click.option('--layout',             help='File names: ours (images/<thousands>/<index>.png) or original (<batch>_<position>.png)', type=click.Choice(['ours', 'original']), default='ours', show_default=True)
@click.option('--save_separate',      help='Save each image as its own PNG (False: only the collages, with --save_collage)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--corruption_pattern', help='Pattern of the sampling mask', type=click.Choice(list(CORRUPTION_PATTERNS)), default='dust', show_default=True)
@click.option('--corruption_probability', help='p of the sampling mask', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.8, show_default=True)
@click.option('--delta_probability',  help='δ of the sampling mask', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option('--seed',               help='Image i uses seed + i', metavar='INT', type=int, default=0, show_default=True)
@click.option('--num_inference_steps', help='DDPM steps', metavar='INT', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--guidance_scale',     help='Classifier-free guidance (> 1 enables it; the negative prompt is empty)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--prompt',             help='Text prompt (default: the empty prompt, as in training with --empty_text)', metavar='STR', type=str, default='', show_default=True)
@click.option('--empty_embeds',       help='Empty-prompt embedding: used if it exists, else computed with the text encoder and saved [default: OUTPUT_DIR/empty_embeds.pt]', metavar='PT', type=str)
@click.option('--variance_type',      help='DDPM noise: posterior variance (the original) or the UNet\'s learned range', type=click.Choice(VARIANCE_TYPES), default='fixed_small', show_default=True)
@click.option('--upscale',            help='Upscale with IF stage II into upscaled/', is_flag=True)
@click.option('--upscaler_model',     help='IF stage-II model: hub id or local directory', metavar='ID|DIR', type=str, default=ambient_if.IF_STAGE_II, show_default=True)
@click.option('--upscale_steps',      help='Stage-II DDPM steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--noise_level',        help='Stage-II noise augmentation level of the low-resolution input', metavar='INT', type=click.IntRange(0, 999), default=250, show_default=True)
@click.option('--variant',            help='Weight variant to load (e.g. fp16)', metavar='STR', type=str)
@click.option('--cache_dir',          help='Cache of hub models', metavar='DIR', type=str)
def main(**kwargs):
    """Sample images from an ambient-fine-tuned DeepFloyd IF model."""
    c = dnnlib.EasyDict(kwargs)
    if c.empty_embeds is None:
        c.empty_embeds = os.path.join(c.output_dir, 'empty_embeds.pt')
    if not c.save_separate and not c.save_collage:
        raise click.UsageError('--save_separate=False keeps only the collages: add --save_collage, or nothing is saved')
    if c.batch_resume_index * c.batch_size >= c.num_images:
        raise click.ClickException(f'--batch_resume_index={c.batch_resume_index} starts past the last of '
                                   f'{c.num_images} images (batches of {c.batch_size})')
    with one_line_errors():
        check_output_dir(c.output_dir, '--output_dir')
        generate(c)


if __name__ == '__main__':
    main()

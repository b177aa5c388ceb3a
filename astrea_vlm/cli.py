"""The ``astrea`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from astrea_vlm.demo import DemoSettings, run_demo

    extra = {} if args.warmup_steps is None else {"warmup_steps": args.warmup_steps}
    run_demo(DemoSettings(recipe=args.recipe, output=args.output, seed=args.seed, test_size=args.test_size,
                          threads=args.threads, **extra))
    return 0


def _pretrain_llm(args: argparse.Namespace) -> int:
    from astrea_vlm.train.pretrain_llm import PretrainSettings, pretrain_world_llm

    fields = {k: getattr(args, k) for k in ("scenes", "steps", "seed", "threads", "learning_rate", "init_from")
              if getattr(args, k) is not None}
    summary = pretrain_world_llm(PretrainSettings(**fields), output=args.output)
    print(f"astrea pretrain-llm: wrote {args.output} in {summary['seconds']:.0f} s")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from astrea_vlm.demo import DemoSettings, run_ablation

    run_ablation(args.what, seeds=args.seeds, base=DemoSettings(recipe=args.recipe, output=args.output, threads=args.threads),
                 rerun=args.rerun)
    return 0


def _create(args: argparse.Namespace) -> int:
    from astrea_vlm.create import create

    towers = {role: getattr(args, role) for role in ("caption", "classification", "detection", "segmentation") if getattr(args, role)}
    start = time.perf_counter()
    folder = create(args.preset, args.output, seed=args.seed, llm=args.llm, tokenizer=args.tokenizer, towers=towers, dtype=args.dtype)
    print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))}) in {time.perf_counter() - start:.1f} s")
    return 0


def _align(args: argparse.Namespace) -> int:
    from astrea_vlm.train.run import run_align
    from astrea_vlm.train.recipe import load_recipe

    run_align(_with_distributed(load_recipe(args.recipe), args), args.output, resume=args.resume)
    _end_distributed()
    return 0


def _end_distributed() -> None:
    """Under torchrun: every rank leaves the process group together (a rank exiting while its peer
    still holds gloo connections can take the peer down)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _with_distributed(recipe, args: argparse.Namespace):
    """``--fsdp`` overrides the recipe's ``distributed`` key."""
    if getattr(args, "fsdp", False):
        import dataclasses

        return dataclasses.replace(recipe, distributed="fsdp")
    return recipe


def _instruct(args: argparse.Namespace) -> int:
    from astrea_vlm.train.run import run_instruct
    from astrea_vlm.train.recipe import load_recipe

    run_instruct(_with_distributed(load_recipe(args.recipe), args), args.output, resume=args.resume, init_from=args.init_from)
    _end_distributed()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from astrea_vlm.eval.runner import run_eval

    results = run_eval(args.model, args.task, args.data, output=args.output, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device,
                       image_position=args.image_position)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in results["metrics"].items()}
    print(f"astrea eval {args.task}: {json.dumps(shown)}")
    if args.update_card:
        from astrea_vlm.card import record_eval_results

        print(f"recorded the results in {record_eval_results(args.model, results)}")
    print(f"wrote {results['output']}/results.json and results.md")
    return 0


# ------------------------------------------------------------------ astrea cache build: its --data
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _resolve_image(value, base: Path):
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            import io

            from PIL import Image

            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return str(path if path.is_absolute() else base / path)
    if value is None:
        raise ValueError("an image entry is empty")
    return value  # PIL image, array, tensor


def _record_images(record, base: Path) -> list:
    if isinstance(record, (str, os.PathLike)):
        return [_resolve_image(record, base)]
    if isinstance(record, dict):
        if record.get("images") is not None:
            return [_resolve_image(v, base) for v in record["images"]]
        if "image" in record:
            return [] if record["image"] is None else [_resolve_image(record["image"], base)]
    raise ValueError(f"a --data record must be an image path or a dict with 'image' or 'images', got {str(record)[:80]!r}")


def load_image_list(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list:
    """The images named by a ``--data`` file or folder, in order (paths stay paths: read lazily).

    * ``.json``: a list (or ``{"data" | "records" | "images": [...]}``) of image paths or records with
      ``image`` (a path, or a ``datasets`` ``{"bytes", "path"}`` dict) or ``images`` (a list);
    * ``.jsonl``: one such path (a JSON string) or record per line;
    * a ``datasets`` folder (``save_to_disk``): its ``images`` (list) or ``image`` column, every split;
    * any other folder: its image files (``.png``, ``.jpg``, ...), sorted by name.

    Relative paths are relative to ``images_dir`` when given, else to the data file (or folder).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no --data at {path}")
    if path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((path / m).is_file() for m in markers):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
            images = []
            for split in splits:
                column = "images" if "images" in split.column_names else "image" if "image" in split.column_names else None
                if column is None:
                    raise ValueError(f"{path} has no 'images' or 'image' column (columns: {split.column_names})")
                for value in split[column]:
                    images.extend(_record_images({column: value}, Path(images_dir or path)))
            return images
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files and is not a `datasets` folder")
        return [str(p) for p in files]
    base = Path(images_dir) if images_dir is not None else path.parent
    from .eval.data import read_json_records

    records = read_json_records(path, ("data", "records", "images"))
    if records is None:
        raise ValueError(f"--data {path}: use a .json / .jsonl file, a `datasets` folder or a folder of images")
    return [image for record in records for image in _record_images(record, base)]


def build_from_folder(model_dir: str | os.PathLike | None, data: str | os.PathLike | None, output: str | os.PathLike | None,
                      roles: Sequence[str] | None = None, kind: str = "tower", batch_size: int = 8,
                      device: str | None = None, progress: bool = True, *, recipe: str | os.PathLike | None = None,
                      images_dir: str | os.PathLike | None = None, log=print) -> dict[str, Any]:
    """``astrea cache build``: cache the images of ``data`` or of a recipe's training data.

    The model is the saved folder ``model_dir``, or else the one the recipe's training starts from
    (``model.path``, or its seeded random preset). The images are ``data`` (a COCO or LLaVA
    training JSON whose paths are relative to ``images_dir``, or anything :func:`load_image_list`
    reads), or else the recipe's ``data:`` section as training reads it
    (:mod:`astrea_vlm.train.feature_cache.sources`). ``output`` defaults to the recipe's cache
    folder (``cache_dir``, or ``<output_dir>/feature_cache``), where its training will look.
    """
    import torch

    from .train.feature_cache import FeatureCache

    if model_dir is None and recipe is None:
        raise ValueError("give --model (a saved Astrea folder) or --recipe (the model its training starts from)")
    if data is None and recipe is None:
        raise ValueError("give --data (image list, COCO / LLaVA JSON with --images) or --recipe (its `data:` section)")
    loaded_recipe = None
    if recipe is not None:
        from .train.recipe import load_recipe

        loaded_recipe = load_recipe(recipe)
    if model_dir is not None:
        from .modeling import AstreaForConditionalGeneration
        from .processing import AstreaProcessor

        if not Path(model_dir, "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not an Astrea folder (no config.json); write one with `astrea create`")
        model = AstreaForConditionalGeneration.from_pretrained(str(model_dir))
        processor = AstreaProcessor.from_pretrained(str(model_dir))
    else:
        from .train.run import load_model_and_processor

        model, processor = load_model_and_processor(loaded_recipe)
    if output is None:
        output = loaded_recipe.feature_cache_dir() if loaded_recipe is not None else None
        if output is None:
            raise ValueError("give --output (the recipe says `cache: false`, so it names no cache folder)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(device)
    if data is not None:
        images = _training_data_images(data, images_dir, log)
    else:
        from .train.feature_cache.sources import recipe_images

        images = recipe_images(loaded_recipe.data, log=log)
    stats = FeatureCache(output).build(model, processor, images, roles=roles, kind=kind, batch_size=batch_size,
                                       progress=progress)
    stats["output"] = str(output)
    return stats


def _training_data_images(data: str | os.PathLike, images_dir: str | os.PathLike | None, log) -> list:
    """``--data``: a COCO / LLaVA training JSON through the training loaders, anything else through load_image_list."""
    from .train.feature_cache.sources import json_format, training_json_images

    path = Path(data)
    if path.suffix == ".json" and path.is_file():
        kind = json_format(json.loads(path.read_text(encoding="utf-8")))
        if kind == "coco" and images_dir is None:
            raise ValueError(f"{path} is a COCO file: its `file_name`s are relative to the image folder; pass --images DIR")
        if kind is not None:
            return training_json_images(path, images_dir, log=log)
    return load_image_list(path, images_dir)


def _cache_build(args: argparse.Namespace) -> int:
    roles = [r.strip() for r in args.roles.split(",") if r.strip()] if args.roles else None
    stats = build_from_folder(args.model, args.data, args.output, roles=roles, kind=args.kind,
                              batch_size=args.batch_size, device=args.device, recipe=args.recipe, images_dir=args.images)
    print(f"astrea cache build: {stats['images']} image(s), {args.kind} features, computed {json.dumps(stats['computed'])}, "
          f"already cached {json.dumps(stats['skipped'])}, {stats['shards']} shard(s) in {stats['seconds']:.1f} s -> {stats['output']}")
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not any(action.default is x for x in (None, False, True, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _recipe_arguments(parser: argparse.ArgumentParser, resume: str) -> None:
    """The arguments ``astrea align`` and ``astrea instruct`` share (``resume``: what ``--resume`` does)."""
    parser.add_argument("--recipe", required=True, help="recipe YAML, or a shipped recipe name (tiny, astrea-13b)")
    parser.add_argument("--output", help="output folder (default: the recipe's output_dir)")
    parser.add_argument("--resume", action="store_true", help=resume)
    parser.add_argument("--fsdp", action="store_true", help="shard the model over the processes of a torchrun launch "
                        "(FSDP2; the recipe's `distributed: fsdp`); default: the recipe's setting")


def build_parser() -> argparse.ArgumentParser:
    """The ``astrea`` argument parser (building it imports nothing heavy)."""
    from astrea_vlm import __version__

    parser = argparse.ArgumentParser(prog="astrea", description="Astrea: a mixture-of-experts VLM with progressive pre-alignment",
                                     formatter_class=_DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_DefaultsFormatter)

    demo = command("demo", "train and evaluate a tiny Astrea end to end on the synthetic world (offline, minutes)")
    demo.add_argument("--recipe", default="demo", help="recipe YAML or shipped recipe name")
    demo.add_argument("--output", default="outputs/demo", help="output folder (data, checkpoints, report)")
    demo.add_argument("--seed", type=int, default=0, help="offsets the data, model and training seeds")
    demo.add_argument("--test-size", type=int, default=128, help="test (and validation) scenes, 7 questions each")
    demo.add_argument("--warmup-steps", type=int, help="tower warm-up steps for every expert, 0 for random towers "
                      "(default: caption and segmentation 1200, classification and detection 300)")
    demo.add_argument("--threads", type=int, default=2, help="torch threads; the same seed and threads give the same "
                      "tables on the same machine")
    demo.set_defaults(func=_demo)

    pretrain = command("pretrain-llm", "pretrain the demo's toy LLM on the synthetic world's language (see "
                       "astrea_vlm.train.pretrain_llm); the demo ships the result")
    pretrain.add_argument("--output", required=True, help="folder for model.safetensors, the tokenizer and pretrain.json "
                          "(the shipped one is astrea_vlm/train/world_llm)")
    pretrain.add_argument("--scenes", type=int, help="pretraining scenes (default: 8000, PretrainSettings.scenes)")
    pretrain.add_argument("--steps", type=int, help="optimizer steps (default: 12000, PretrainSettings.steps)")
    pretrain.add_argument("--seed", type=int, help="scene and init seed (default: 1000, PretrainSettings.seed)")
    pretrain.add_argument("--threads", type=int, help="torch threads; the same settings give the same weights on the same "
                          "machine (default: 1, PretrainSettings.threads)")
    pretrain.add_argument("--learning-rate", type=float, help="peak learning rate (default: 2e-3, PretrainSettings.learning_rate)")
    pretrain.add_argument("--init-from", help="continue from this world LLM folder (its weights and tokenizer) instead of "
                          "random weights and a new tokenizer (default: none)")
    pretrain.set_defaults(func=_pretrain_llm)

    ablate = command("ablate", "rerun the demo pipeline with the paper's ablation variants (Tables 3, 4, 6)")
    ablate.add_argument("--what", required=True, choices=["topk", "order", "residual", "moco"],
                        help="top-k routing (Table 3), residual bridges or MoCo (Table 4), stage order (Table 6)")
    ablate.add_argument("--seeds", type=int, default=3, help="seeds per variant (0 .. N-1)")
    ablate.add_argument("--recipe", default="demo", help="recipe YAML or shipped recipe name the variants change")
    ablate.add_argument("--output", default="outputs/demo", help="runs go to <output>/ablation-<what> and <output>/ablation-baseline")
    ablate.add_argument("--threads", type=int, default=2, help="torch threads of every run, as in `astrea demo` (a "
                        "finished run is reused only with the same threads; other than 2, runs go to seed-<s>-threads-<n>)")
    ablate.add_argument("--rerun", action="store_true",
                        help="train every run again (default: reuse finished runs made with the same settings)")
    ablate.set_defaults(func=_ablate)

    create = command("create", "write a Hub-ready Astrea folder (random tiny, or assembled from pretrained parts)")
    create.add_argument("--preset", required=True, choices=["tiny", "astrea-13b", "astrea-34b"],
                        help="tiny: random and offline; astrea-13b / astrea-34b: the paper's pretrained parts")
    create.add_argument("--output", required=True, help="new folder to write")
    create.add_argument("--seed", type=int, default=0, help="seed of the random weights (projectors, bridges, fusion)")
    create.add_argument("--llm", help="Hub id or local folder of the LLM (default: the preset's)")
    create.add_argument("--tokenizer", help="Hub id or local folder of the tokenizer (default: the LLM's)")
    for role in ("caption", "classification", "detection", "segmentation"):
        create.add_argument(f"--{role}", help=f"Hub id or local path of the {role} tower's weights (default: the preset's)")
    create.add_argument("--dtype", default="auto", help="weights dtype of a paper preset: auto (bfloat16), float32, ...")
    create.set_defaults(func=_create)

    align = command("align", "progressive pre-alignment: caption -> classification -> detection -> segmentation")
    _recipe_arguments(align, resume="skip finished stages and resume the current one from its last checkpoint")
    align.set_defaults(func=_align)

    instruct = command("instruct", "instruction tuning with MoE fusion and momentum contrast")
    _recipe_arguments(instruct, resume="resume from the last checkpoint")
    instruct.add_argument("--init-from", help="aligned folder to start from (default: <output>/aligned; aligned first if missing)")
    instruct.set_defaults(func=_instruct)

    evaluate = command("eval", "evaluate a model folder on a local dataset (batched greedy generation)")
    evaluate.add_argument("--model", required=True, help="model folder (written by `astrea create` or training)")
    evaluate.add_argument("--task", required=True, choices=["vqa", "exact_match", "multiple_choice", "grounding", "caption", "qa"],
                          help="metric: vqa, exact_match, multiple_choice, grounding, caption, or qa (each record's question_type)")
    evaluate.add_argument("--data", required=True, help="local JSON / JSONL file or `datasets` folder (see astrea_vlm.eval.data)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts generated together (the demo evaluates with "
                          "the same, so this command reproduces its report)")
    evaluate.add_argument("--output", help="results folder (default: outputs/eval/<model>/<task>, outside the model folder)")
    evaluate.add_argument("--max-new-tokens", type=int, help="longest generated answer, in tokens (default: the model "
                          "folder's generation_config.json max_new_tokens, else 64)")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N records (default: all)")
    evaluate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--update-card", action="store_true",
                          help="also record the results in the model folder's README.md card (its model-index); "
                               "by default nothing in the model folder changes")
    evaluate.add_argument("--image-position", choices=["before", "after"],
                          help="put the images before or after the prompt (default: the layout saved with the model, "
                               "i.e. how it was trained)")
    evaluate.set_defaults(func=_eval)

    cache = command("cache", "feature cache of the frozen experts (see docs/feature_cache.md)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    cache_build = cache_sub.add_parser("build", help="compute and store tower tokens / projected features once per image",
                                       formatter_class=_DefaultsFormatter)
    cache_build.add_argument("--model", help="model folder (written by `astrea create` or training); default: the model "
                             "the --recipe's training starts from")
    cache_build.add_argument("--recipe", help="training recipe (YAML path or shipped name): its model, its `data:` section's "
                             "images as training reads them, and its cache folder as the default --output")
    cache_build.add_argument("--data", help="COCO captions / instances JSON or LLaVA conversation JSON (paths relative to "
                             "--images), a JSON / JSONL list of image paths or records with 'image' / 'images', a `datasets` "
                             "folder with an 'images' or 'image' column, or a folder of images; default: the --recipe's data")
    cache_build.add_argument("--images", help="folder the --data file's image paths are relative to (default: the file's folder)")
    cache_build.add_argument("--output", help="cache folder (created or extended); default: the --recipe's cache_dir, "
                             "or <output_dir>/feature_cache")
    cache_build.add_argument("--roles", help="comma-separated experts (default: all)")
    cache_build.add_argument("--kind", default="tower", choices=["tower", "projected"],
                             help="tower tokens, or projected features C_i (the projector's output)")
    cache_build.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    cache_build.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    cache_build.set_defaults(func=_cache_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        # Bad input (a recipe, a folder, a dataset): the message names the problem and the fix;
        # a traceback through torch would only hide it. Set ASTREA_TRACEBACK=1 to see it anyway.
        if os.environ.get("ASTREA_TRACEBACK"):
            raise
        print(f"astrea {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

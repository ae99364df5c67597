"""Command line: ``lora_trainer train | demo | inspect | config``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import RESUME_MAY_CHANGE, TrainConfig
from .errors import LoraTrainerError


def _progress_listener(quiet: bool = False):
    """Print events: a tqdm bar for steps when tqdm is installed, plain lines otherwise."""
    from .train.events import (
        CachingProgress,
        EpochEnd,
        FileSaved,
        Message,
        StepEvent,
        TrainingFinished,
        TrainingStarted,
    )

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    state: dict = {"bar": None}

    def fmt_eta(s: float) -> str:
        s = int(s)
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    def write(text: str) -> None:
        if state["bar"] is not None:
            state["bar"].write(text)
        else:
            print(text, flush=True)

    def on_event(ev) -> None:
        if isinstance(ev, Message):
            write({"warning": "WARNING: ", "error": "ERROR: "}.get(ev.level, "") + ev.text)
        elif isinstance(ev, TrainingStarted):
            write(ev.summary)
            if tqdm is not None and not quiet:
                state["bar"] = tqdm(total=ev.total_steps, unit="step", dynamic_ncols=True, file=sys.stdout)
        elif isinstance(ev, CachingProgress):
            if ev.done == ev.total and ev.total:
                write(f"latents cached: {ev.total} images")
        elif isinstance(ev, StepEvent):
            if state["bar"] is not None:
                state["bar"].update(ev.step - state["bar"].n)
                lr = next(iter(ev.lrs.values()), 0.0)
                state["bar"].set_postfix(epoch=ev.epoch, loss=f"{ev.loss:.4f}", avg=f"{ev.loss_average:.4f}", lr=f"{lr:.2e}")
            elif not quiet:
                print(
                    f"step {ev.step}/{ev.total_steps} epoch {ev.epoch} loss {ev.loss:.4f} avg {ev.loss_average:.4f} "
                    f"eta {fmt_eta(ev.eta)}",
                    flush=True,
                )
        elif isinstance(ev, EpochEnd):
            write(f"epoch {ev.epoch} done: mean loss {ev.loss_epoch:.4f}")
        elif isinstance(ev, FileSaved):
            name = Path(ev.path).stem
            write(f"saved {ev.path}   (prompt tag: <lora:{name}:1>)")
        elif isinstance(ev, TrainingFinished):
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            print(("stopped" if ev.stopped else "finished") + f" after {ev.steps} steps in {ev.seconds:.1f} s", flush=True)

    return on_event


def _make_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.load(args.config) if getattr(args, "config", None) else TrainConfig()
    sets = list(getattr(args, "set", None) or [])
    for opt, key in (("model", "pretrained_model"), ("data", "train_data_dir"), ("output", "output_dir"), ("name", "output_name")):
        v = getattr(args, opt, None)
        if v is not None:
            sets.append(f"{key}={v}")
    return cfg.with_overrides(sets).validate()


def _events(args: argparse.Namespace, cfg: TrainConfig):
    from .train.events import EventBus

    bus = EventBus(_progress_listener(getattr(args, "quiet", False)))
    if cfg.logging_dir:
        from .train.tensorboard import tensorboard_listener

        listener = tensorboard_listener(cfg.logging_dir, cfg.output_name)
        if listener is None:
            bus.warning("logging_dir is set but TensorBoard is not installed (pip install tensorboard): not logging")
        else:
            bus.subscribe(listener)
    return bus


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _make_config(args)
    if args.print_config:
        print(cfg.to_toml())
        return 0
    from .hosts.standalone import StandaloneHost
    from .train.loop import train
    from .train.runtime import Runtime

    runtime = Runtime.from_env(cfg.mixed_precision, args.device)
    bus = _events(args, cfg)
    if runtime.world_size == 1 and "MASTER_ADDR" in os.environ and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        bus.warning(
            "accelerate launch --cpu starts ONE process (whatever --num_processes says; several CPU processes need "
            "mpirun): training in a single process. For N CPU processes use accelerate launch --multi_gpu "
            "--num_processes N (without --cpu, with --device cpu) or torchrun --nproc_per_node N"
        )
    if not runtime.is_main:
        bus = type(bus)()  # other processes train silently
    from .train.loop import preflight
    from .train.state import find_state

    if args.resume:
        cfg.resume = "latest" if args.resume is True else str(args.resume)
    resume = find_state(cfg, cfg.resume) if cfg.resume else None
    # dataset, output names and the state to resume first: a wrong folder must not wait for a multi-GB model load
    scan = preflight(cfg, bus, overwrite=args.overwrite, resume=resume, world_size=runtime.world_size)
    bundle = StandaloneHost().model_bundle(cfg, runtime)
    train(cfg, bundle, bus, runtime=runtime, scan=scan, overwrite=args.overwrite, resume=resume)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a LoRA of the tiny world's character on the shipped pretrained tiny model and score each epoch."""
    # Passive OpenMP waits: spinning threads make CPU training several times slower on a shared machine
    # (only takes effect when torch is not imported yet, as in `lora_trainer demo`).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .demo import (
        DEMO_IMAGES,
        DEMO_REPEATS,
        DemoScorer,
        demo_base_model,
        demo_config,
        load_demo_model,
        make_demo_dataset,
    )
    from .hosts.standalone import StandaloneHost
    from .train.loop import train
    from .train.runtime import Runtime

    try:
        from tqdm import tqdm

        say = tqdm.write  # prints above a progress bar instead of through it
    except ImportError:  # pragma: no cover
        say = print
    out = Path(args.out).resolve()
    run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
    data = make_demo_dataset(run_dir, images=DEMO_IMAGES, repeats=DEMO_REPEATS)
    lora_dir = run_dir / "models" / "Lora"
    model = getattr(args, "model", "sd15")
    cfg = demo_config(data, lora_dir, args.epochs, model).with_overrides(args.set or []).validate()
    cfg.save(run_dir / "config.toml")
    _, about, pretrained = demo_base_model(model)
    print(f"demo dataset: {data}  (the 'ohwx' character: a yellow ring with a red dot)")
    print(f"base model: {cfg.pretrained_model}  ({about})")
    runtime = Runtime.from_env(cfg.mixed_precision, "cpu")
    parts = load_demo_model(model)
    bundle = StandaloneHost(parts).model_bundle(cfg, runtime)
    scorer = DemoScorer(parts, samples_dir=run_dir / "samples", write=say)
    scorer.score_base()
    bus = _events(args, cfg)
    bus.subscribe(scorer.on_event)
    result = train(cfg, bundle, bus, runtime=runtime)
    print(f"\n{len(result.files)} LoRA files in {lora_dir}:")
    for f in result.files:
        print(f"  {f.name}")
    print("\nlearning score on fixed seeds: 'character' = share of pictures for \"ohwx, a ring on a <colour> background\"")
    print("showing the yellow ring with the red dot; 'others' = share of pictures for other prompts of the world drawn right")
    print(scorer.table())
    if not pretrained:
        print("(a random model: the score needs the pretrained SDXL twin, tools/make_tiny_world.py --arch sdxl)")
    print(f"sample pictures: {run_dir / 'samples'}")
    print(f"config used: {run_dir / 'config.toml'}  (re-run with: lora_trainer train --config ...)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError, safe_open

    if not Path(args.file).is_file():
        raise LoraTrainerError(f"{args.file}: no such file. Give the path of a .safetensors LoRA file")
    try:
        with safe_open(args.file, "pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise LoraTrainerError(f"{args.file}: not a readable .safetensors file ({e})") from None
    modules = sorted({k.split(".")[0] for k in keys})
    print(f"{args.file}: {len(keys)} tensors, {len(modules)} modules")
    for prefix in ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"):
        n = sum(m.startswith(prefix) for m in modules)
        if n:
            print(f"  {prefix}*: {n}")
    for k in sorted(meta):
        v = meta[k]
        if len(v) > 120 and not args.full:
            v = v[:117] + "..."
        print(f"  {k} = {v}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _make_config(args)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=1))
    else:
        print(cfg.to_toml(), end="")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .grid import GridSpec, build_grid, default_prompt, free_grid_path, run_prefix
    from .hosts.standalone import StandaloneGenerator, StandaloneHost

    files = [str(Path(f)) for f in args.files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise LoraTrainerError(f"LoRA file not found: {missing[0]}")
    cfg = _make_config(args)
    weights = cfg.with_overrides([f"grid_weights={args.weights}"]).grid_weight_list() if args.weights else cfg.grid_weight_list()
    spec = GridSpec(
        files=files,
        weights=weights,
        seeds=args.seed or [cfg.grid_seed],
        prompt=args.prompt if args.prompt is not None else (cfg.grid_prompt or default_prompt(files, args.trigger)),
        negative_prompt=args.negative if args.negative is not None else cfg.grid_negative_prompt,
        steps=args.steps or cfg.grid_steps,
        cfg_scale=cfg.grid_cfg_scale,
        width=args.size or cfg.resolution,
        height=args.size or cfg.resolution,
        sampler_name="DDIM",
    )
    generate = StandaloneGenerator(StandaloneHost().load_parts(cfg))
    out = Path(args.out) if args.out else free_grid_path(Path(files[0]).parent, run_prefix(files))
    n = len(spec.cells())
    print(f"{len(spec.columns())} epochs x {len(spec.weights)} weights x {len(spec.seeds)} seeds = {n} images; prompt: {spec.prompt}")
    # an explicit --out is replaced as asked; the default name never replaces an earlier grid
    result = build_grid(
        spec, generate, progress=lambda d, t: print(f"\r{d}/{t}", end="", flush=True), out_path=out, replace=bool(args.out)
    )
    print(f"\ngrid saved: {result.path}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui.stack import check_stack

    # a known-broken gradio / pydantic / starlette / huggingface_hub combination: one line naming the install
    # that works, before gradio is imported (with huggingface_hub 1.x, gradio 4 cannot even be imported)
    check_stack()
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        from .errors import MissingPackageError

        raise MissingPackageError("gradio", "lora_trainer ui", '-e ".[standalone,ui]" (in the lora_trainer folder)') from None
    from .api import PREFIX, add_routes, parse_credentials
    from .hosts.standalone import standalone_backend
    from .roots import Roots
    from .ui.guard import is_loopback, launch_guarded, new_token
    from .ui.tab import build_tab

    credentials = parse_credentials(args.auth)
    if not is_loopback(args.host) and not credentials:
        raise LoraTrainerError(
            f"--host {args.host} lets other machines reach the page, which trains, writes files and reads folders: "
            "add --auth user:password (or leave --host at 127.0.0.1)"
        )
    cfg = _make_config(args)
    root = Path(__file__).resolve().parent.parent
    css = (root / "style.css").read_text() if (root / "style.css").is_file() else None
    roots = Roots.from_start(args.data_root or [os.getcwd()], args.models_root or [os.getcwd()], cfg)
    backend = standalone_backend(defaults=cfg, roots=roots)
    tab = build_tab(backend, css=css)
    # the token travels in the printed link; LORA_TRAINER_TOKEN fixes it for scripts that start the page
    token = os.environ.get("LORA_TRAINER_TOKEN") or new_token()
    app = launch_guarded(tab, args.host, args.port, token, credentials)
    add_routes(app, backend.start, backend.stop, backend.status, backend.defaults, lambda c: Path(c.output_dir),
               start_grid=backend.start_grid, fixed_fields={"output_dir": cfg.output_dir})
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"Open http://{shown}:{args.port}/?token={token}", flush=True)
    print(f"Datasets under {', '.join(roots.data)}; models under {', '.join(roots.models)}", flush=True)
    print(f"REST routes: {PREFIX}/train, /status, /stop, /stop_and_save, /grid "
          f"(send 'Authorization: Bearer {token}'{' or the --auth credentials' if credentials else ''})", flush=True)
    tab.block_thread()
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """``prepare report | crop | repeats | layout | tags | import-kohya | export-kohya | preset``."""
    from .dataset import prepare as prep

    what = args.prepare_command
    if what == "report":
        from .dataset.report import dataset_report

        rep = dataset_report(args.folder, resolution=args.resolution, caption_extension=args.ext, faces=False if args.no_faces else None)
        if args.json:
            print(rep.to_json())
        else:
            for row in rep.rows():
                if row[-1]:
                    print(f"  {row[0]}: {row[-1]}")
            print(rep.summary())
    elif what == "crop":
        from .dataset.faces import crop_images

        rep = crop_images(
            args.source, args.out, mode=args.mode, size=args.size, margin=args.margin, color=args.color,
            caption_extension=args.ext, overwrite=args.overwrite,
        )
        print(rep.summary())
    elif what in ("repeats", "layout"):
        repeats = getattr(args, "repeats", None)
        images = prep.list_images(args.images) if what == "layout" else None
        if repeats is None:
            if not args.steps:
                raise LoraTrainerError("give --repeats, or --steps (target optimizer steps) to compute them")
            n = len(images) if images is not None else args.count
            if not n:
                raise LoraTrainerError("give --count (number of images) to compute repeats")
            repeats, _per_epoch, _total, formula = prep.repeats_for(args.steps, n, args.epochs, args.batch, args.accum)
            print(formula)
        if what == "layout":
            res = prep.write_layout(
                args.project, args.name, images, repeats, caption_extension=args.ext, convert_all=args.convert_all,
                overwrite=args.overwrite,
            )
            print(res.summary())
    elif what == "tags":
        if args.trigger or args.remove or args.replace or args.dedupe:
            res = prep.edit_captions(
                args.folder, trigger=args.trigger, remove=args.remove or [],
                replace=prep.parse_replacements("\n".join(args.replace or [])), dedupe=args.dedupe,
                caption_extension=args.ext, create_missing=args.create_missing, dry_run=args.dry_run,
            )
            print(res.summary())
            for p in res.changed + res.created:
                print(f"  {p}")
        if args.freq or not (args.trigger or args.remove or args.replace or args.dedupe):
            for tag, count in prep.tag_frequencies(args.folder, args.ext)[: args.top]:
                print(f"{count:6d}  {tag}")
    elif what == "import-kohya":
        from .kohya_ss import import_kohya_ss

        cfg, unknown, notes = import_kohya_ss(args.file)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if unknown:
            print(f"keys with no equivalent ({len(unknown)}): {', '.join(unknown)}", file=sys.stderr)
        if args.out:
            if Path(args.out).exists() and not args.overwrite:
                raise LoraTrainerError(f"{args.out} exists already; pass --overwrite to replace it")
            cfg.save(args.out)
            print(f"written {args.out}")
        else:
            print(cfg.to_toml(), end="")
    elif what == "export-kohya":
        from .kohya_ss import export_kohya_ss

        text = json.dumps(export_kohya_ss(_make_config(args)), indent=4, ensure_ascii=False)
        if args.out:
            if Path(args.out).exists() and not args.overwrite:
                raise LoraTrainerError(f"{args.out} exists already; pass --overwrite to replace it")
            Path(args.out).write_text(text + "\n", encoding="utf-8")
            print(f"written {args.out}")
        else:
            print(text)
    elif what == "preset":
        from .presets import load_preset, presets_info, save_user_preset

        if args.save:
            path = save_user_preset(args.save, _make_config(args), args.user_dir or ".", overwrite=args.overwrite)
            print(f"written {path}")
        elif args.name:
            print(load_preset(args.name, user_folder=args.user_dir).to_toml(), end="")
        else:
            for info in presets_info(args.user_dir):
                print(f"{info.name}{'' if info.builtin else '  (user)'}\n    {info.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora_trainer", description="Train Stable Diffusion LoRAs (kohya-format files).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML configuration file")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option (repeatable)")

    t = sub.add_parser("train", help="train a LoRA from a config file and/or options")
    common(t)
    t.add_argument("--model", help="base model (.safetensors or diffusers folder); same as --set pretrained_model=")
    t.add_argument("--data", help="train_data_dir with <repeats>_<name>/ folders")
    t.add_argument("--output", help="output_dir for the LoRA files")
    t.add_argument("--name", help="output_name")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    t.add_argument("--overwrite", action="store_true", help="allow replacing existing files of the same output_name")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="STATE",
        help="continue a stopped run of this config from its latest training state (or from STATE: a step-*.json, "
        "its .state or their folder); refused when the run would change. Options it may change: "
        + ", ".join(RESUME_MAY_CHANGE),
    )
    t.add_argument("--print-config", action="store_true", help="print the resulting config as TOML and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser(
        "demo", help="train a LoRA of a synthetic character on the shipped tiny pretrained model and score each epoch (no download)"
    )
    d.add_argument("--out", default="demo_output", help="folder for the demo run (default: demo_output)")
    d.add_argument(
        "--model", choices=("sd15", "sdxl"), default="sd15",
        help="base model architecture: the tiny world's SD1.5 model (default) or its SDXL twin",
    )
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option (repeatable)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="show the keys and metadata of a LoRA file")
    i.add_argument("file")
    i.add_argument("--full", action="store_true", help="do not shorten long values")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("grid", help="build an epochs x weights grid from saved LoRA files (standalone sampler)")
    common(g)
    g.add_argument("files", nargs="+", help="epoch files, e.g. models/Lora/alice-*.safetensors")
    g.add_argument("--model", dest="model", help="base model (as train --model)")
    g.add_argument("--weights", help="comma-separated LoRA weights (default: grid_weights)")
    g.add_argument("--seed", type=int, action="append", help="seed (repeat for extra row blocks)")
    g.add_argument("--prompt", help="prompt (default: trigger word + most frequent tags)")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--trigger", default="", help="trigger word put first in the default prompt")
    g.add_argument("--steps", type=int, help="sampling steps (default: grid_steps)")
    g.add_argument("--size", type=int, help="image size (default: resolution)")
    g.add_argument("--out", help="PNG path (default: next to the first file)")
    g.set_defaults(func=cmd_grid)

    u = sub.add_parser("ui", help="serve the training tab on its own Gradio page (standalone host)")
    common(u)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--auth", metavar="USER:PASSWORD", help="HTTP basic credentials for the page and the REST routes "
                   "(user:pass[,user2:pass2], as the WebUIs' --api-auth); needed to listen on a network address")
    u.add_argument("--data-root", action="append", metavar="FOLDER", help="a folder whose datasets the page may train "
                   "on (repeatable; default: the current folder, plus the config's train_data_dir)")
    u.add_argument("--models-root", action="append", metavar="FOLDER", help="a folder whose models the page may load "
                   "(repeatable; default: the current folder, plus the config's model folder)")
    u.set_defaults(func=cmd_ui)

    c = sub.add_parser("config", help="print the default (or resulting) configuration as TOML")
    common(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config)

    pr = sub.add_parser("prepare", help="prepare a dataset: report, face crops, repeats, layout, tags, presets, kohya_ss configs")
    ps = pr.add_subparsers(dest="prepare_command", required=True)
    r = ps.add_parser("report", help="inspect a folder of images (nothing is changed)")
    r.add_argument("folder")
    r.add_argument("--resolution", type=int, default=512)
    r.add_argument("--ext", default=".txt", help="caption extension (default .txt)")
    r.add_argument("--no-faces", action="store_true", help="do not count faces")
    r.add_argument("--json", action="store_true")
    cr = ps.add_parser("crop", help="square crops around the largest face (or centre/pad) into another folder")
    cr.add_argument("source", help="folder with the original images (only read)")
    cr.add_argument("out", help="folder for the crops (PNG)")
    cr.add_argument("--mode", choices=["face", "center", "pad"], default="face")
    cr.add_argument("--size", type=int, default=512)
    cr.add_argument("--margin", type=float, default=0.5, help="room around the face, in face sizes (0.3 head only, 1.5 head and shoulders)")
    cr.add_argument("--color", default="#ffffff", help="padding colour for --mode pad")
    cr.add_argument("--ext", default=".txt")
    cr.add_argument("--overwrite", action="store_true")
    rp = ps.add_parser("repeats", help="repeats for a target number of steps (batch size counted)")
    rp.add_argument("--steps", type=int, required=True, help="target optimizer steps")
    rp.add_argument("--count", type=int, required=True, help="number of images")
    ly = ps.add_parser("layout", help="write project/img/<repeats>_<name>/, project/model/, project/log/")
    for sp in (rp, ly):
        sp.add_argument("--epochs", type=int, default=10)
        sp.add_argument("--batch", type=int, default=1)
        sp.add_argument("--accum", type=int, default=1)
    ly.add_argument("project")
    ly.add_argument("--name", required=True, help="subset name (the caption of images without a caption file)")
    ly.add_argument("--images", required=True, help="folder with the images (copied; captions next to them too)")
    ly.add_argument("--repeats", type=int)
    ly.add_argument("--steps", type=int, help="target optimizer steps (instead of --repeats)")
    ly.add_argument("--ext", default=".txt")
    ly.add_argument("--convert-all", action="store_true", help="convert every image to PNG")
    ly.add_argument("--overwrite", action="store_true")
    tg = ps.add_parser("tags", help="edit the tags of every caption in a folder, or list tag frequencies")
    tg.add_argument("folder")
    tg.add_argument("--trigger", help="tag (trigger word) to put first in every caption")
    tg.add_argument("--remove", action="append", metavar="TAG")
    tg.add_argument("--replace", action="append", metavar="OLD=NEW")
    tg.add_argument("--dedupe", action="store_true", help="remove repeated tags")
    tg.add_argument("--create-missing", action="store_true", help="give images without a caption one with the trigger")
    tg.add_argument("--dry-run", action="store_true")
    tg.add_argument("--freq", action="store_true", help="list tag frequencies")
    tg.add_argument("--top", type=int, default=50)
    tg.add_argument("--ext", default=".txt")
    ik = ps.add_parser("import-kohya", help="convert a kohya_ss LoRA JSON into a TOML config")
    ik.add_argument("file")
    ik.add_argument("--out", help="TOML file to write (default: print)")
    ik.add_argument("--overwrite", action="store_true")
    ek = ps.add_parser("export-kohya", help="write a config as a kohya_ss LoRA JSON")
    common(ek)
    ek.add_argument("--out", help="JSON file to write (default: print)")
    ek.add_argument("--overwrite", action="store_true")
    pp = ps.add_parser("preset", help="list presets, print one as TOML, or save a config as a user preset")
    common(pp)
    pp.add_argument("name", nargs="?")
    pp.add_argument("--user-dir", help="folder of user presets")
    pp.add_argument("--save", metavar="NAME", help="save --config/--set as user preset NAME in --user-dir")
    pp.add_argument("--overwrite", action="store_true")
    pr.set_defaults(func=cmd_prepare)
    return p


def _quiet_library_noise() -> None:
    """Warnings from third-party imports that say nothing to a user of this tool."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_noise()
    try:
        return args.func(args)
    except LoraTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

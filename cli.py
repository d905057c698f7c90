"""The command line of every entry point and script: the argument parser, YAML config files, value types, and the
error policy (a plausible mistake is one line on stderr and an exit code, never a traceback).

A flag's value comes from the command line, else `--config FILE` (whose `_base_` file comes under it), else, for
the flags that describe the model, the checkpoint being resumed or evaluated (run.Run), else the default."""

import argparse
import contextlib
import difflib
import errno
import json
import os
import sys

import torch
import torch.distributed as dist
import yaml

from errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, Preempted, RunFailure, UsageError
from utils import AMP_DTYPES


def number_type(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float within [low, high] (open ends where asked)."""

    def convert(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f'expected {"an integer" if kind is int else "a number"}, got {text!r}'
            ) from None
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if value != value or abs(value) == float('inf') or too_low or too_high:
            bounds = f'{"(" if low_open else "["}{low}, {"" if high is None else high}{")" if high_open else "]"}'
            raise argparse.ArgumentTypeError(f'must be in {bounds}, got {text}'.replace(', ]', ', inf)'))
        return value

    convert.__name__ = kind.__name__
    return convert


COUNT = number_type(int, 1)
NON_NEGATIVE_INT = number_type(int, 0)
NON_NEGATIVE = number_type(float, 0)
POSITIVE = number_type(float, 0, low_open=True)
FRACTION = number_type(float, 0, 1)  # a probability, a rate


def json_object(text: str) -> dict:
    """argparse type of --model-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as \'{"depths": [1, 1, 2, 1]}\'')
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default."""

    def _format_action(self, action):
        if action.option_strings and not action.help:
            action.help = '(default: %(default)s)'  # argparse leaves out a flag without help text, and its default
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ''
        return text if '(default: ' in text else super()._get_help_string(action)  # said already (recipes)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, no abbreviations (an unknown flag is answered with the closest one),
    `--config FILE` (YAML whose keys are flag names), and `args.given`: the destinations the user set."""

    def __init__(self, *args, with_config: bool = True, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)
        self.with_config = with_config
        if with_config:
            self.add_argument(
                '--config',
                default='',
                help='YAML file of flag values (keys: flag names without '
                'dashes; `_base_: FILE` inherits another); the command line overrides it',
            )

    def error(self, message):
        raise UsageError(f'{message} (see python {os.path.basename(sys.argv[0])} --help)')

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        options = [o for o in self._option_string_actions if o.startswith('--')]
        for token in argv[: argv.index('--') if '--' in argv else len(argv)]:
            name = token.split('=', 1)[0]
            if name.startswith('--') and name not in options:
                close = difflib.get_close_matches(name, options, n=1)
                self.error(f'unknown flag {name!r}' + (f"; did you mean '{close[0]}'?" if close else ''))
        tokens = []
        if self.with_config:
            path = super().parse_known_args(argv)[0].config
            tokens = config_tokens(read_config(path), self, path) if path else []
        unset = object()  # which destinations the config or the command line set
        blank = argparse.Namespace(
            **{a.dest: unset for a in self._actions if a.dest != 'help'}, **{k: unset for k in self._defaults}
        )
        given = {k for k, v in vars(super().parse_args(tokens + argv, blank)).items() if v is not unset}
        args = super().parse_args(tokens + argv, namespace)
        args.given = given - {'config'}
        return args

    def to_config(self, args) -> dict:
        """The flag values as {flag name: value}, readable again with --config."""
        values = {}
        for action in self._actions:
            names = [o[2:] for o in action.option_strings if o.startswith('--')]
            if names and action.dest not in ('help', 'config') and action.dest not in values:
                value = getattr(args, action.dest)
                values[action.dest] = (names[0], value.type if isinstance(value, torch.device) else value)
        return dict(values.values())


def read_config(path: str, _seen=()) -> dict:
    """{flag name: value} of a YAML config, its `_base_` file (relative to it) read first and overridden."""
    if not os.path.isfile(path):
        raise UsageError(f'config file {path} does not exist')
    if os.path.abspath(path) in _seen:
        raise UsageError(f'config {path} inherits itself through _base_')
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f'config {path} is not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(data, dict):
        raise UsageError(f'config {path} must map flag names to values, e.g. "batch-size: 128"')
    base = data.pop('_base_', None)
    values = (
        read_config(os.path.join(os.path.dirname(path), str(base)), (*_seen, os.path.abspath(path))) if base else {}
    )
    return {**values, **{str(k): v for k, v in data.items()}}


def config_tokens(values: dict, parser: argparse.ArgumentParser, path: str) -> list:
    """A config's values as command-line tokens, checked by the parser exactly as the command line is."""
    options = {o[2:]: a for a in parser._actions for o in a.option_strings if o.startswith('--') and a.dest != 'config'}
    tokens = []
    for key, value in values.items():
        action = options.get(key)
        if action is None:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise UsageError(f'unknown key {key!r} in config {path}: keys are flag names without dashes{hint}')
        if value is None and action.default is None:
            continue  # the flag's own default (a run's config.yaml writes it so)
        if value is None:
            raise UsageError(f'{key} in config {path} is empty: give a value, or leave the key out')
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f'{key}: {value!r} in config {path} is not valid (expected true or false)')
            if isinstance(action, argparse.BooleanOptionalAction):
                on = value if f'--{key}' == action.option_strings[0] else not value  # `no-model-ema: true`: off
                tokens.append(f'--{"" if on else "no-"}{action.option_strings[0][2:]}')
            elif value == (action.const is True):
                tokens.append(f'--{key}')
        elif isinstance(value, list) and action.nargs not in (None, '?'):
            tokens += [f'--{key}', *map(str, value)]
        else:
            tokens.append(f'--{key}={json.dumps(value) if isinstance(value, dict) else value}')
    try:
        argparse.ArgumentParser.parse_known_args(parser, tokens)
    except UsageError as e:
        raise UsageError(f'{str(e).split(" (see ")[0]} (in config {path})') from None
    return tokens


def add_common_arguments(parser: ArgumentParser, *, model: str, batch_size: int, num_workers: int, print_freq: int):
    """The flags every entry point shares (run.Run reads them). Returns the training group, which the entry point
    extends."""
    import models

    parser.add_argument(
        '--model', default=model, help='RAVLT_T, RAVLT_S, RAVLT_B, RAVLT_L (or ravlt_t ..., any timm model)'
    )
    parser.add_argument(
        '--model-kwargs',
        default=None,
        type=json_object,
        metavar='JSON',
        help='extra model arguments, e.g. \'{"depths": [1, 1, 2, 1]}\' (a mapping in a config file)',
    )
    training = parser.add_argument_group('training')
    rates = ', '.join(f'{name.upper()} {cfg["drop_path_rate"]}' for name, cfg in models.RAVLT_CONFIGS.items())
    training.add_argument(
        '--drop-path',
        type=FRACTION,
        default=None,
        metavar='RATE',
        help=f"stochastic depth (default: the variant's own: {rates})",
    )
    parser.add_argument('--batch-size', default=batch_size, type=COUNT, help='images per process and step')
    parser.add_argument('--data-path', default='', help='data folder')
    parser.add_argument(
        '--resume',
        default='',
        help='resume from this checkpoint (default: OUTPUT_DIR/checkpoint.pth '
        'if it exists); with --eval, evaluate it. Its model flags apply unless given',
    )
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--output_dir', '--output-dir', default='', help='where checkpoints and logs go')
    parser.add_argument('--device', default=None, choices=['cpu', 'cuda'], help='default: cuda if available')
    parser.add_argument('--amp', default=None, choices=list(AMP_DTYPES), help='autocast (default: fp16 on CUDA)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model for training and evaluation')
    parser.add_argument('--seed', default=0, type=NON_NEGATIVE_INT)
    parser.add_argument(
        '--num_workers',
        '--num-workers',
        default=None,
        type=NON_NEGATIVE_INT,
        help=f'data-loading processes per process (default: {num_workers}, at most the cores per process)',
    )
    parser.add_argument(
        '--pin-mem', action=argparse.BooleanOptionalAction, default=True, help='pin host memory on CUDA'
    )
    parser.add_argument('--print-freq', default=print_freq, type=COUNT, metavar='N', help='print every N steps')
    parser.add_argument(
        '--dist-timeout',
        default=60,
        type=POSITIVE,
        metavar='MINUTES',
        help='how long a process waits for the others (rank 0 saving, scoring COCO)',
    )
    parser.add_argument(
        '--dist-backend',
        default=None,
        choices=['nccl', 'gloo'],
        help='default: nccl on CUDA, gloo on the CPU (gloo also takes CUDA tensors)',
    )
    parser.add_argument(
        '--deterministic',
        action='store_true',
        help='deterministic kernels and gradient reductions: '
        'a resumed run ends bit-identical to one never stopped, with any process count',
    )
    parser.set_defaults(default_num_workers=num_workers)
    return training


# ----------------------------------------------------------------------------------------------------
# The error policy
# ----------------------------------------------------------------------------------------------------


# Files that cannot be written: a full disk or quota, a read-only or foreign file, the output folder removed.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)


def _failure_line(e: BaseException):
    """(exit code, line, whether every process reports it) for an error a user can act on, else None (a bug)."""
    if isinstance(e, UsageError):
        return EXIT_USAGE, f'error: {e}', not e.everywhere
    if isinstance(e, Preempted):
        return EXIT_PREEMPTED, f'stopped: {e}', False  # every process agreed: rank 0 says it
    if isinstance(e, (FloatingPointError, RunFailure)):
        return EXIT_FAILURE, f'error: {e}', True
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f'error: interrupted; {str(e) or "the checkpoints on disk are whole"}', True
    text = ' '.join(str(e).split())
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text:
        advice = 'lower --batch-size, the input size or --num_workers (or use --amp bf16)'
        return EXIT_FAILURE, f'error: out of memory ({text[:200]}); {advice}; the checkpoints on disk are whole', True
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        where = f' ({e.filename})' if e.filename else ''
        return EXIT_FAILURE, f'error: {os.strerror(e.errno).lower()}{where}; the checkpoints on disk are whole', True
    if isinstance(e, RuntimeError) and 'DataLoader worker' in text:
        return EXIT_FAILURE, f'error: {text[:300]} (out of memory? lower --num_workers or --batch-size)', True
    if isinstance(e, RuntimeError) and 'does not have a deterministic implementation' in text:
        return EXIT_USAGE, f'error: --deterministic: {text[:300]}', True
    return None


@contextlib.contextmanager
def one_line_errors():
    """Run a command's body: a mistake the user can act on ends it with one line on stderr (prefixed with the rank
    when there are several processes) and its exit code (errors.py); anything else is a bug and keeps its
    traceback. A failed process exits at once, without waiting for the others: the launcher ends them."""
    try:
        yield
    except Exception as e:
        failure = _failure_line(e)
        if failure is None:
            raise
    except KeyboardInterrupt as e:
        failure = _failure_line(e)
    else:
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    code, line, everyone = failure
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if everyone or rank == 0:
        sys.stderr.write(f'{f"[rank {rank}] " if world > 1 else ""}{" ".join(line.split())}\n')
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        os._exit(code)  # never wait in destroy_process_group for a peer that is gone
    sys.exit(code)

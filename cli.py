"""The command line of every entry point: the argument parser, YAML config files, value checks, and the
error policy (bad input ends in one line on stderr and a non-zero exit, never a traceback).

Precedence of a flag's value: the command line, then `--config FILE` (whose `_base_` files come under it),
then, for the flags that describe the model (see `Run`), the checkpoint being resumed or evaluated, then the
parser's default.
"""

import argparse
import copy
import difflib
import errno
import json
import os
import sys
from typing import Optional

import torch
import yaml

import models
from distributed import cleanup_distributed, end_process, is_main_process, peer_failure
from errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    Preempted,
    RunFailure,
    UsageError,
    first_line,
    is_out_of_memory,
    killed_worker,
    report_line,
)
from utils import AMP_DTYPES

# ----------------------------------------------------------------------------------------------------
# Value types: argparse calls them on the command line, `read_config` on YAML values.
# ----------------------------------------------------------------------------------------------------


def _number(kind, text, low=None, high=None, low_open=False, high_open=False):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f'expected {"an integer" if kind is int else "a number"}, got {text!r}'
        ) from None
    if value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
    if (
        value != value
        or (low is not None and (value < low or (low_open and value == low)))
        or (high is not None and (value > high or (high_open and value == high)))
    ):
        lower = '' if low is None else f'{"(" if low_open else "["}{low}'
        upper = '' if high is None else f'{high}{")" if high_open else "]"}'
        wanted = (
            f'in {lower}, {upper}'
            if low is not None and high is not None
            else (f'{"above" if low_open else "at least"} {low}' if low is not None else f'at most {high}')
        )
        raise argparse.ArgumentTypeError(f'must be {wanted}, got {text}')
    return value


def number_type(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: an int or float within [low, high] (open ends where asked)."""

    def convert(text):
        return _number(kind, text, low, high, low_open, high_open)

    convert.kind = kind
    convert.__name__ = kind.__name__
    return convert


def json_object(text: str) -> dict:
    """argparse type of --model-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as \'{"depths": [1, 1, 2, 1]}\'')
    return value


COUNT = number_type(int, 1)  # 1, 2, ...
NON_NEGATIVE_INT = number_type(int, 0)
NON_NEGATIVE = number_type(float, 0)
POSITIVE = number_type(float, 0, low_open=True)
FRACTION = number_type(float, 0, 1)  # a probability, a rate
MAX_DIST_TIMEOUT = 10**6  # minutes (about two years): far above any wait, far below what a timedelta holds


# ----------------------------------------------------------------------------------------------------
# The parser and config files
# ----------------------------------------------------------------------------------------------------


def did_you_mean(name: str, names) -> str:
    """'; did you mean X?' for the closest of `names` to a mistyped `name`, or ''."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean '{close[0]}'?" if close else ''


def _default_text(action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return 'on' if action.default == action.const else 'off'  # whether this switch is in effect
    if action.default is None or action.default == '':
        return 'not set'
    if isinstance(action.default, (list, tuple)):
        return ' '.join(map(str, action.default))
    return str(action.default)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every flag's default after its help (unless the help already says what it is)."""

    def _format_action(self, action):
        if action.option_strings and not action.help and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse leaves flags without help text out of this
            action.help = f'(default: {_default_text(action).replace("%", "%%")})'
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ''
        if (
            not action.option_strings
            or action.required
            or action.default is argparse.SUPPRESS
            or 'default' in text.lower()
        ):
            return text
        return f'{text} (default: {_default_text(action).replace("%", "%%")})'.lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, `--config FILE` (YAML whose keys are flag names) and a record of
    which flags the user gave (`args.given`: destinations set on the command line or in the config).
    Flags are never guessed: an abbreviation is an unknown flag, answered with the closest one."""

    def __init__(self, *args, with_config: bool = True, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, allow_abbrev=False, **kwargs)
        if with_config:
            self.add_argument(
                '--config',
                default='',
                help='YAML file of flag values (keys are flag names without '
                'dashes, e.g. batch-size; `_base_: FILE` inherits another); the command line '
                'overrides it',
            )

    def error(self, message):
        raise UsageError(f'{message} (see python {os.path.basename(sys.argv[0])} --help)')

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        options = [o for o in self._option_string_actions if o.startswith('--')]
        for token in argv:
            if token == '--':
                break
            name = token.split('=', 1)[0]
            if token.startswith('--') and name not in options:  # before argparse's own checks (required flags)
                self.error(f'unknown flag {name!r}{did_you_mean(name, options)}')
        return super().parse_args(argv, namespace)

    def add_training_group(self, title: str):
        """An argument group of flags that only training reads (--eval's settings line leaves them out)."""
        group = self.add_argument_group(title)
        group.training_only = True
        return group

    def long_options(self) -> dict:
        """Every long flag name without dashes -> its action."""
        return {
            opt[2:]: action
            for action in self._actions
            for opt in action.option_strings
            if opt.startswith('--') and action.dest not in ('help', 'config')
        }

    def parse(self, argv=None) -> argparse.Namespace:
        """The flags: the command line over `--config FILE` over the defaults; `args.given` names those the
        user set (the rest may come from a checkpoint, see run.Run)."""
        unset = object()
        dests = {a.dest for a in self._actions if a.dest != 'help'} | set(self._defaults)
        namespace = argparse.Namespace(**dict.fromkeys(dests, unset))
        given = {dest for dest, value in vars(self.parse_args(argv, namespace)).items() if value is not unset}
        args = self.parse_args(argv)
        if getattr(args, 'config', ''):
            config = read_config(args.config, self)
            given |= set(config)
            self.set_defaults(**config)
            args = self.parse_args(argv)
        args.given = given - {'config'}
        return args

    def to_config(self, args) -> dict:
        """The flag values as {flag name: value}, readable again with --config."""
        values, seen = {}, set()
        for name, action in self.long_options().items():
            if action.dest in seen or isinstance(action, argparse._StoreFalseAction):
                continue  # one name per value: the first spelling, the positive form of on/off flags
            seen.add(action.dest)
            value = getattr(args, action.dest)
            values[name] = value.type if isinstance(value, torch.device) else value
        return values

    def evaluation_config(self, args) -> dict:
        """`to_config` without the flags of training groups: what an evaluation reads."""
        training = {
            action.dest
            for group in self._action_groups
            if getattr(group, 'training_only', False)
            for action in group._group_actions
        }
        options = self.long_options()
        return {name: value for name, value in self.to_config(args).items() if options[name].dest not in training}

    def check_saved(self, dest: str, value, where: str):
        """A flag's value saved elsewhere (a checkpoint's flags, by destination), checked as the command line
        checks it; returns it converted, or raises a one-line UsageError naming the flag and `where`."""
        actions = [a for a in self._actions if a.dest == dest and a.option_strings]
        if not actions:
            return value
        action = next((a for a in actions if not isinstance(a, argparse._StoreFalseAction)), actions[0])
        key = next((o[2:] for o in action.option_strings if o.startswith('--')), dest)
        return _config_value(action, key, value, where, dest_value=True)

    def from_config(self, config: dict) -> dict:
        """{dest: value} of a {flag name: value} mapping (unknown names left out)."""
        options = self.long_options()
        return {options[name].dest: value for name, value in config.items() if name in options}


def _config_value(action, key: str, value, where: str, dest_value: bool = False):
    """A YAML value (or a checkpoint's saved flag) checked as strictly as the flag on the command line: no silent
    rounding of 2.7 to 2, no `true` taken for 1, no empty value for a flag that has a default. `where` says
    where the value comes from ('config FILE'); `dest_value`: the value of the destination itself (a
    checkpoint's), not of the flag named `key` (which for --no-x flags is the opposite)."""

    def invalid(reason):
        return UsageError(f'{key}: {_brief(value)} in {where} is not valid ({reason})')

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise invalid('expected true or false')
        return value if dest_value or isinstance(action, argparse._StoreTrueAction) else not value
    if value is None:
        if action.default is not None:
            raise invalid(f'empty; give a value, or leave the key out for the default {_brief(action.default)}')
        return None
    multiple = action.nargs not in (None, '?')
    if multiple != isinstance(value, list):
        raise invalid('expected a list such as [1, 2]' if multiple else 'expected a single value')
    convert = action.type
    if convert is json_object:
        if isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise invalid('expected a mapping such as {depths: [1, 1, 2, 1]}')
    kind = getattr(convert, 'kind', None)

    def one(item):
        if kind is not None and (
            isinstance(item, bool)
            or (kind is int and not isinstance(item, int))
            or (kind is float and not isinstance(item, (int, float, str)))
        ):
            raise invalid(f'expected {"an integer" if kind is int else "a number"}')
        if (
            kind is None
            and convert is not json_object
            and (isinstance(item, bool) or not isinstance(item, (str, int, float)))
        ):
            raise invalid('expected a single value')
        if convert is None:
            if dest_value and not isinstance(item, str):  # saved from a parsed flag: always text
                raise invalid('expected text')
            return str(item)  # a string flag: `data-path: 2024` is the folder '2024'
        try:
            return convert(item if isinstance(item, str) else str(item))
        except argparse.ArgumentTypeError as e:
            raise invalid(str(e)) from None

    converted = [one(v) for v in value] if multiple else one(value)
    for item in converted if multiple else [converted]:
        if action.choices is not None and item not in action.choices:
            raise UsageError(f'{key}: {_brief(value)} in {where} is not one of {", ".join(map(str, action.choices))}')
    if multiple and isinstance(action.nargs, int) and len(converted) != action.nargs:
        raise invalid(f'expected {action.nargs} values')
    return converted


def _brief(value, limit: int = 80) -> str:
    """repr(value) for an error line, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + '...'


# A config file of flags holds tens of values; aliases (&a ... *a) may make a small file expand to billions.
MAX_CONFIG_VALUES = 10_000


def _expanded_size(node, sizes: dict, open_nodes: set) -> int:
    """How many YAML nodes `node` stands for once its aliases are expanded (at most MAX_CONFIG_VALUES + 1)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:  # an alias of one of its own ancestors: infinite
        return MAX_CONFIG_VALUES + 1
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total = min(total + _expanded_size(child, sizes, open_nodes), MAX_CONFIG_VALUES + 1)
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _load_yaml(stream, path: str):
    """yaml.safe_load, refusing a document that expands (through aliases) to more than MAX_CONFIG_VALUES
    values before any of it is built."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_CONFIG_VALUES:
            raise UsageError(
                f'config {path} expands to more than {MAX_CONFIG_VALUES} values (through YAML aliases '
                '&name / *name, or a recursive one): write the values out'
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config(path: str, parser: Optional[ArgumentParser], _seen=()) -> dict:
    """{dest: value} from a YAML file whose keys are flag names (without dashes), each checked as `parser` checks
    the flag; `_base_: FILE` (relative to the file) is read first and overridden. Without a parser, {flag name:
    value} as written (for tools that read another script's config without that script's flags)."""
    if not os.path.isfile(path):
        raise UsageError(f'config file {path} does not exist')
    if os.path.abspath(path) in _seen:
        raise UsageError(f'config {path} inherits itself through _base_')
    try:
        with open(path) as f:
            data = _load_yaml(f, path)
    except yaml.YAMLError as e:
        raise UsageError(f'config {path} is not valid YAML ({str(e).splitlines()[0]})') from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f'config {path} cannot be read ({e})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f'config {path} must map flag names to values, e.g. "batch-size: 128"')
    values = {}
    base = data.pop('_base_', None)
    if base is not None:
        if not isinstance(base, str):
            raise UsageError(f'_base_ in config {path} must be a file name')
        values.update(read_config(os.path.join(os.path.dirname(path), base), parser, (*_seen, os.path.abspath(path))))
    if parser is None:
        return {**values, **{str(k): v for k, v in data.items()}}
    options = parser.long_options()
    for key, value in data.items():
        action = options.get(str(key))
        if action is None:
            raise UsageError(
                f'unknown key {_brief(key)} in config {path}: keys are flag names without dashes'
                f'{did_you_mean(str(key), options)}'
            )
        values[action.dest] = _config_value(action, str(key), value, f'config {path}')
    return values


def add_run_arguments(parser: ArgumentParser, *, model: str, batch_size: int, num_workers: int, print_freq: int):
    """The flags every entry point shares (run.Run reads them). Returns the group of training flags, which
    the entry point extends."""
    parser.add_argument(
        '--model', default=model, metavar='MODEL', help='RAVLT_T, RAVLT_S, RAVLT_B, RAVLT_L (or ravlt_t ...)'
    )
    parser.add_argument(
        '--model-kwargs',
        default=None,
        type=json_object,
        metavar='JSON',
        help='extra model arguments as a JSON object, e.g. \'{"embed_dims": [32, 64, 128, 256], '
        '"depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}\' (a mapping in a config file)',
    )
    training = parser.add_training_group('training')
    rates = ', '.join(f'{name.upper()} {config["drop_path_rate"]}' for name, config in models.RAVLT_CONFIGS.items())
    training.add_argument(
        '--drop-path',
        type=FRACTION,
        default=None,
        metavar='RATE',
        help=f"stochastic depth rate (default: the variant's own: {rates})",
    )
    parser.add_argument('--batch-size', default=batch_size, type=COUNT, help='images per process and step')
    parser.add_argument('--data-path', default='', help='data folder')
    parser.add_argument(
        '--resume',
        default='',
        help='resume from this checkpoint (default: OUTPUT_DIR/'
        'checkpoint.pth if it exists); with --eval, evaluate it. The model flags it was trained '
        'with apply unless given again',
    )
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument(
        '--output_dir', '--output-dir', default='', help='where to write checkpoints and logs (empty: write nothing)'
    )
    parser.add_argument('--device', default=None, choices=['cpu', 'cuda'], help='default: cuda if available')
    parser.add_argument(
        '--amp',
        default=None,
        choices=list(AMP_DTYPES),
        help='autocast precision (default: fp16 on CUDA, as the authors, none on the CPU)',
    )
    parser.add_argument(
        '--compile',
        action='store_true',
        help='torch.compile the model (Inductor) for the training steps and the evaluations (its '
        'inference form); the first steps compile (minutes; cached for later runs). Needs a C++ '
        'compiler on the CPU, triton on CUDA. Checkpoints are the same as without it',
    )
    parser.add_argument('--seed', default=0, type=NON_NEGATIVE_INT)
    parser.add_argument(
        '--num_workers',
        '--num-workers',
        default=None,
        type=NON_NEGATIVE_INT,
        help=f'data loading processes per training process (default: {num_workers}, or the CPU '
        'cores per process if fewer)',
    )
    parser.add_argument('--print-freq', default=print_freq, type=COUNT, metavar='N', help='print every N steps')
    parser.add_argument(
        '--dist-timeout',
        default=60,
        type=number_type(float, 0, MAX_DIST_TIMEOUT, low_open=True),
        metavar='MINUTES',
        help='how long a process waits for the others in a collective (rank 0 alone scores COCO '
        'and writes checkpoints meanwhile) before the run fails',
    )
    parser.add_argument(
        '--dist-backend',
        default=None,
        choices=['nccl', 'gloo'],
        help='process group backend (default: nccl on CUDA, gloo on the CPU; gloo also takes CUDA '
        'tensors, e.g. for several processes on one GPU)',
    )
    parser.add_argument(
        '--deterministic',
        action='store_true',
        help='deterministic algorithms (torch.use_deterministic_algorithms, cuDNN without '
        'benchmarking, a fixed cuBLAS workspace): a resumed CUDA run ends bit-identical to one '
        'never stopped, at some speed (the CPU always is); an operation without a deterministic '
        'kernel stops the run',
    )
    parser.set_defaults(default_num_workers=num_workers)
    return training


# ----------------------------------------------------------------------------------------------------
# The error policy
# ----------------------------------------------------------------------------------------------------


def _report(message: str, code: int, everyone: bool = True, alone: bool = True) -> int:
    """End this process with one line on stderr (only where `everyone`). `alone`: this process failed by itself
    (not an outcome all processes agreed on), so the others are told to end too (distributed.end_process)."""
    end_process((code, message) if alone else None)
    if everyone:
        report_line(message)
    return code


def run_cli(main_fn, argv):
    """Run `main_fn(argv)` as a command and exit with its code: a UsageError is one line on stderr and exit 2;
    a non-finite loss, running out of memory (also the CPU's plain RuntimeError) or disk, a data-loading worker
    killed, a RunFailure or losing contact with another process one line and 1;
    a preemption signal one line and 3; Ctrl-C one line and 130. Each line names its rank when there are
    several processes; when one process fails alone, the others end within seconds with its exit code, and
    rank 0 repeats its line. Anything else is a bug and keeps its traceback."""
    code = 0
    try:
        try:
            main_fn(argv)
        except UsageError as e:
            code = _report(
                f'error: {e}', EXIT_USAGE, everyone=not e.everywhere or is_main_process(), alone=not e.everywhere
            )
        except Preempted as e:
            code = _report(
                f'stopped: {e}', EXIT_PREEMPTED, everyone=not e.everywhere or is_main_process(), alone=not e.everywhere
            )
        except (FloatingPointError, RunFailure) as e:
            code = _report(f'error: {e}', EXIT_FAILURE)
        except MemoryError as e:
            code = _report(_out_of_memory_line(e), EXIT_FAILURE)
        except KeyboardInterrupt:
            code = _report(
                'error: interrupted; the checkpoints on disk are whole (the last one written is the resume point)',
                EXIT_INTERRUPTED,
            )
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
                raise
            where = f' ({e.filename})' if e.filename else ''
            code = _report(
                f'error: {os.strerror(e.errno).lower()}{where}; the checkpoints already on disk are whole', EXIT_FAILURE
            )
        except RuntimeError as e:
            worker = killed_worker(e)
            if is_out_of_memory(e):
                code = _report(_out_of_memory_line(e), EXIT_FAILURE)
            elif NONDETERMINISTIC in str(e):
                code = _report(
                    f'error: --deterministic: {str(e).split(NONDETERMINISTIC)[0].strip()} has no '
                    'deterministic implementation on this device; run without --deterministic',
                    EXIT_USAGE,
                )
            elif worker is not None:
                cause = (
                    "most likely the kernel's out-of-memory killer: lower --num_workers or --batch-size"
                    if 'Killed' in worker
                    else 'killed or crashed; if memory is short, lower --num_workers or --batch-size'
                )
                code = _report(
                    f'error: a data-loading worker {worker} ({cause}); the checkpoints on disk are whole', EXIT_FAILURE
                )
            elif not _lost_contact(e):
                raise
            else:
                peer = peer_failure()  # the process that failed, if it said so: its line rather than ours
                if peer is not None:
                    rank, code, line = peer
                    label, _, text = line.partition(': ')
                    code = _report(f'{label}: rank {rank}: {text}', code, everyone=is_main_process(), alone=False)
                else:
                    code = _report(
                        f'error: lost contact with another process ({first_line(e)}); see the other '
                        "processes' messages",
                        EXIT_FAILURE,
                    )
    except SystemExit:
        raise
    except BaseException as e:  # a bug: its traceback follows; the other processes end too
        end_process((EXIT_FAILURE, f'error: {first_line(e)}'))
        raise
    finally:
        cleanup_distributed()
    if code:
        sys.exit(code)


def _out_of_memory_line(error: BaseException) -> str:
    detail = ' '.join(str(error).split())
    detail = detail if len(detail) <= 200 else detail[:197] + '...'
    return (
        f'error: out of memory ({detail or type(error).__name__}); lower --batch-size, the input size or '
        '--num_workers (or use --amp bf16/fp16); the checkpoints on disk are whole'
    )


# What torch says of an operation without a deterministic kernel under torch.use_deterministic_algorithms(True).
NONDETERMINISTIC = 'does not have a deterministic implementation'


def _lost_contact(error: RuntimeError) -> bool:
    """A collective failed because another process died or stopped answering."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return int(os.environ.get('WORLD_SIZE', 1)) > 1 and any(
        marker in text
        for marker in (
            'Connection closed by peer',
            'Connection reset by peer',
            'gloo',
            'NCCL',
            'Timed out',
            'timed out',
        )
    )


# ----------------------------------------------------------------------------------------------------
# Detection and segmentation: one recipe per --task, under the command line and the config
# ----------------------------------------------------------------------------------------------------


def add_dense_arguments(parser: ArgumentParser, training, tasks):
    """--task, --pretrained and the flags each task's recipe sets (into the `training` group); left at None
    they take the recipe's value."""
    parser.add_argument('--task', default=tasks[0], choices=list(tasks))
    training.add_argument(
        '--pretrained',
        default='',
        help='backbone weights: an ImageNet checkpoint (ours or the '
        "authors') or the authors' mmdet / mmseg checkpoint (its backbone part)",
    )
    training.add_argument('--lr', type=POSITIVE, default=None, help='learning rate (not scaled with the batch)')
    training.add_argument('--weight-decay', type=NON_NEGATIVE, default=None)
    training.add_argument('--warmup-iters', type=NON_NEGATIVE_INT, default=None, help='linear warm-up steps')
    training.add_argument('--warmup-ratio', type=FRACTION, default=None, help='warm-up starts at lr * this')


def show_recipe_defaults(parser: ArgumentParser, recipes: dict):
    """--help gives each recipe flag's default per --task (call once every flag is added)."""
    for action in parser._actions:
        values = {task: recipe[action.dest] for task, recipe in recipes.items() if action.dest in recipe}
        if values and action.default is None:
            shown = {task: ' '.join(map(str, v)) if isinstance(v, list) else str(v) for task, v in values.items()}
            text = (
                next(iter(shown.values()))
                if len(set(shown.values())) == 1
                else ', '.join(f'{v} for {task}' for task, v in shown.items())
            )
            action.help = f"{action.help or ''} (default: {text}, the --task recipe's)".lstrip()


def apply_recipe(args, recipes: dict):
    """Flags left at None take the value of their task's recipe (`recipes[args.task]`)."""
    for key, value in recipes[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args

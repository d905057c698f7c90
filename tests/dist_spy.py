"""main.py under torchrun, recording for tests/test_train_distributed.py what each process saw: the
training indices and the parameters after every epoch, and its evaluation shard (into $SPY_DIR)."""
import os
import sys

import torch
from timm.utils import unwrap_model

import engine
import main
import utils

SPY_DIR = os.environ['SPY_DIR']
RANK = int(os.environ['RANK'])


def train_one_epoch(**kwargs):
    stats = engine.train_one_epoch(**kwargs)
    params = {k: v.detach().clone() for k, v in unwrap_model(kwargs['model']).named_parameters()}
    torch.save({'indices': list(kwargs['data_loader'].sampler), 'params': params},
               os.path.join(SPY_DIR, f'train_rank{RANK}_epoch{kwargs["epoch"]}.pt'))
    return stats


def evaluate(data_loader, *args, **kwargs):
    torch.save(list(data_loader.dataset.indices), os.path.join(SPY_DIR, f'eval_rank{RANK}.pt'))
    return engine.evaluate(data_loader, *args, **kwargs)


if __name__ == '__main__':
    main.train_one_epoch = train_one_epoch
    main.evaluate = evaluate
    utils.run_cli(main.cli, sys.argv[1:])

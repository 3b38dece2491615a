"""fastssl.reference: plain-PyTorch ground truth for every loss and op of docs/api.md.

Each follows the upstream formulas step by step and materialises the full matrices; never the
fast path, always the thing the fast paths are tested against."""
from fastssl.reference.contrastive import nt_xent, info_nce, dcl, dclw, sogclr, sce
from fastssl.reference.sphere import sfrik, sfrik_mmd, auh
from fastssl.reference.sortnet import groco, soft_sort
from fastssl.reference.swav import sinkhorn, swav
from fastssl.reference.dino import dino, dino_center, ibot_patch, koleo

__all__ = ['nt_xent', 'info_nce', 'dcl', 'dclw', 'sogclr', 'sce', 'sfrik', 'sfrik_mmd', 'auh',
           'groco', 'soft_sort', 'sinkhorn', 'swav', 'dino', 'dino_center', 'ibot_patch',
           'koleo']

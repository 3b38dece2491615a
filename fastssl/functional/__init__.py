"""fastssl.functional: the stateless losses and ops of docs/api.md (validation, normalisation,
gather, then the fused ops)."""
from fastssl.functional.contrastive import nt_xent, info_nce, dcl, dclw, sogclr, sce
from fastssl.functional.sphere import sfrik, sfrik_mmd, auh
from fastssl.functional.sortnet import groco, soft_sort
from fastssl.functional.swav import sinkhorn, swav
from fastssl.functional.dino import dino, dino_center, ibot_patch, koleo

__all__ = ['nt_xent', 'info_nce', 'dcl', 'dclw', 'sogclr', 'sce', 'sfrik', 'sfrik_mmd', 'auh',
           'groco', 'soft_sort', 'sinkhorn', 'swav', 'dino', 'dino_center', 'ibot_patch',
           'koleo']

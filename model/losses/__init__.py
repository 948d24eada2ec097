"""hsc.model.losses: the training losses of HSC, one pure function per equation."""

# --- SEAM / EPS baseline losses (baseline.py) ---
from .baseline import (  # noqa: F401 - re-exported
    EPSSaliencyTerms,
    ERECRTerms,
    adaptive_min_pooling_k,
    adaptive_min_pooling_loss,
    ecr_topk_k,
    eps_saliency_loss,
    eps_saliency_terms,
    er_ecr_terms,
    max_norm,
    max_onehot,
    multilabel_soft_margin_loss,
)

# --- end of the baseline block ---
# --- HSC contrast losses and the HSC loss block (contrast.py, hsc_block.py) ---
from .contrast import (  # noqa: F401 - re-exported
    CSCOutput,
    PSCOutput,
    RSCOutput,
    csc_loss,
    psc_loss,
    psc_prototypes,
    psc_topk,
    rsc_loss,
    rsc_representations,
    sim_min,
)
from .hsc_block import (  # noqa: F401 - re-exported
    HSCLoss,
    HSCLossConfig,
    HSCLossOutput,
    crf_images,
    hsc_grid,
    hsc_loss,
    hsc_pseudo_labels,
    normalize_cam,
    refine_labels_crf,
)

# --- end of the HSC contrast block ---

"""What the original works reported, quoted beside our measurements.

Every entry quotes only text that was read (the paper's abstract, or a named account of the paper
where the paper's own page could not be read), with the page it was read from. Where no figure
could be read, ``reported`` says "not found" rather than giving a remembered number. Where the
text came from an account rather than from the paper, ``reference`` says so.
"""

from __future__ import annotations

__all__ = ["SOURCES", "NOT_FOUND"]

NOT_FOUND = "not found"

_BN = "Ioffe & Szegedy 2015, \"Batch Normalization: Accelerating Deep Network Training by " \
      "Reducing Internal Covariate Shift\""
_BN_ABSTRACT = "https://research.google/pubs/batch-normalization-accelerating-deep-network-" \
               "training-by-reducing-internal-covariate-shift"
# The paper's §4 text was read in a bilingual transcription stored in a public GitHub repository,
# reached through the search tool's code index, which names the file by id but not by repository.
_BN_TEXT = "public transcription of the paper's §4 (GitHub code index, file id 23530435964)"
_BN_FIG3 = "public reading note tabulating Figure 3 (GitHub code index, file id 67597945327)"

SOURCES: dict[str, dict[str, str]] = {
    "speed": {
        "reference": f"{_BN}, abstract; §4.2.2 and Figure 3 (ImageNet, Inception)",
        "reported": "\"Applied to a state-of-the-art image classification model, Batch "
                    "Normalization achieves the same accuracy with 14 times fewer training "
                    "steps\" (abstract). Figure 3, steps to reach Inception's 72.2%: Inception "
                    "31.0·10^6, BN-Baseline 13.3·10^6, BN-x5 2.1·10^6, BN-x30 2.7·10^6 (as "
                    "tabulated in a public reading note of the paper; the figure itself was not "
                    "read)",
        "url": f"{_BN_ABSTRACT} ; {_BN_FIG3}",
    },
    "shift": {
        "reference": f"{_BN}, §4.1 and Figure 1(b, c) (MNIST, 3x100 sigmoid network)",
        "reported": "a plot, no number: \"As training progresses, the distribution for the "
                    "baseline network shifts significantly, which makes training slow and "
                    "difficult. By contrast, the distribution for the batch-normalized network "
                    "remains much more stable, enabling faster training.\" (§4.1, read in a "
                    "public transcription of the paper's text)",
        "url": _BN_TEXT,
    },
    "learning_rate": {
        "reference": f"{_BN}, §4.2.2 (ImageNet, Inception)",
        "reported": "BN-x5: \"The initial learning rate was increased by a factor of 5, to "
                    "0.0075. The same learning rate increase with the original Inception caused "
                    "the model parameters to reach machine infinity.\" BN-x30: \"with the "
                    "initial learning rate 0.045 (30 times that of Inception)\", reaching 74.8% "
                    "(read in a public transcription of §4.2.2)",
        "url": _BN_TEXT,
    },
    "initialization": {
        "reference": f"{_BN}, abstract",
        "reported": "\"Batch Normalization allows us to use much higher learning rates and be "
                    "less careful about initialization.\" A figure for a range of initial "
                    f"scales: {NOT_FOUND}",
        "url": _BN_ABSTRACT,
    },
    "regularization": {
        "reference": f"{_BN}, abstract",
        "reported": "\"It also acts as a regularizer, in some cases eliminating the need for "
                    f"Dropout.\" A train/test gap figure: {NOT_FOUND}",
        "url": _BN_ABSTRACT,
    },
    "gradients": {
        "reference": f"{_BN}",
        "reported": f"{NOT_FOUND} (no per-layer gradient figure was read)",
        "url": _BN_TEXT,
    },
    "small_batch": {
        "reference": "Wu & He 2018, \"Group Normalization\", abstract (ImageNet, ResNet-50); "
                     "Ioffe 2017, \"Batch Renormalization\", abstract; Hoffer et al. 2017, "
                     "\"Train longer, generalize better\", abstract (ghost batches)",
        "reported": "GroupNorm: \"On ResNet-50 trained in ImageNet, GN has 10.6% lower error "
                    "than its BN counterpart when using a batch size of 2\". Batch Renorm: "
                    "\"Models trained with Batch Renormalization perform substantially better "
                    "than batchnorm when training with small or non-i.i.d. minibatches\" (its "
                    f"small-minibatch accuracies: {NOT_FOUND}). Ghost BN: \"enables significant "
                    "decrease in the generalization gap without increasing the number of "
                    f"updates\" (a small-batch figure: {NOT_FOUND})",
        "url": "https://ar5iv.labs.arxiv.org/html/1803.08494 ; https://proceedings.neurips.cc/"
               "paper/2017/hash/c54e7837e0cd0ced286cb5995327d1ab-Abstract.html ; "
               "https://papers.neurips.cc/paper/2017/hash/a5e0ff62be0b08456fc7f1e88812af3d-"
               "Abstract.html",
    },
    "recurrent": {
        "reference": "Cooijmans et al. 2016, \"Recurrent Batch Normalization\", abstract; "
                     "results listed by Papers with Code",
        "reported": "\"our batch-normalized LSTM consistently leads to faster convergence and "
                    "improved generalization\"; BN-LSTM on sequential MNIST: 99% unpermuted, "
                    "95.4% permuted test accuracy (Papers with Code's listing of the paper's "
                    f"results); the plain LSTM's accuracy and the steps saved: {NOT_FOUND}",
        "url": "https://paperswithcode.com/paper/recurrent-batch-normalization",
    },
    "cost": {
        "reference": "none of the five sources",
        "reported": f"{NOT_FOUND} (no source measures BN's per-step cost or folding)",
        "url": "",
    },
    "consistency": {
        "reference": "Ioffe 2017, \"Batch Renormalization\", abstract",
        "reported": "a hypothesis, no number: BN's weakness with small or non-i.i.d. "
                    "minibatches is attributed to \"the dependence of model layer inputs on all "
                    "the examples in the minibatch, and different activations being produced "
                    f"between training and inference\"; a figure for the gap: {NOT_FOUND}",
        "url": "https://proceedings.neurips.cc/paper/2017/hash/"
               "c54e7837e0cd0ced286cb5995327d1ab-Abstract.html",
    },
    "mechanism": {
        "reference": "Santurkar et al. 2018, \"How Does Batch Normalization Help "
                     "Optimization?\", abstract; its noise experiment on a VGG network as "
                     "described in reading notes",
        "reported": "\"we demonstrate that such distributional stability of inputs has little "
                    "to do with the success of BatchNorm. Instead, we uncover a more fundamental "
                    "impact of BatchNorm on the training process: it makes the optimization "
                    "landscape significantly smoother\" (abstract). The noise: \"we perturb each "
                    "activation for each sample in the batch using i.i.d. noise sampled from a "
                    "non-zero mean and non-unit variance distribution\", and the noisy network "
                    "has \"less stable distributions than even the standard, non-BatchNorm "
                    "network, yet it still performs better in terms of training\" (as "
                    "quoted in public reading notes); the training curves' numbers: "
                    f"{NOT_FOUND}",
        "url": "https://docslib.org/doc/7950054/how-does-batch-normalization-help-optimization ; "
               "https://jameslahm.github.io/2019/11/19/how-does-BN-help-optimaztion.html ; "
               "public reading note (GitHub code index, file id 29261129202)",
    },
}

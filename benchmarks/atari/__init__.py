"""Atari end-to-end study (issue 6): recording, metrics and reports.

``data`` records action-free multi-game clips (the "internet video" for pretraining) and
action-labelled episodes of a held-out game in the causalize episode format; ``metrics`` holds
per-frame PSNR / SSIM; ``report`` writes plots, side-by-side GIFs and markdown tables.
"""

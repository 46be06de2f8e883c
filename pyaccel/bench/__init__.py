"""pyaccel's benchmark suite: ``python -m pyaccel.bench [--quick]``.

Every kernel runs side by side with what a user would otherwise run, interleaved
in one process (round-robin: one call of each candidate per round), and the
report gives medians with spread, GOP/s, % of peak, error in dB and the ISA.
"""

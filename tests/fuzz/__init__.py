"""Fuzzing fedgate's streams: a grammar of XMPP S2S and component streams
rendered to bytes, byte-level mutation and random segmentation
(:mod:`tests.fuzz.grammar`), the real role handlers driven in memory with
an oracle per case (:mod:`tests.fuzz.roles`, :mod:`tests.fuzz.run`), and
a client that does the same over loopback against ``twistd fedgate``
(:mod:`tests.fuzz.loopback`).

CI runs a short pass (tests/test_fuzz.py); the long run is ``scripts/fuzz``.
"""

import os as _os
import tempfile as _tempfile

from hypothesis.configuration import set_hypothesis_home_dir as _set_home

# No example database is used (every run says database=None), but newer
# hypothesis also caches constants from the source under its home
# directory, by default ./.hypothesis: keep that out of the checkout (and
# out of the Debian build tree).
_set_home(_os.path.join(_tempfile.gettempdir(), "fedgate-hypothesis"))

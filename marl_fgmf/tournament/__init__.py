from marl_fgmf.tournament.driver import *  # noqa: F401,F403
from marl_fgmf.tournament.driver import __all__  # noqa: F401

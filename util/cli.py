"""The help text of every script's flags: `HelpFormatter` adds "(default: X)" where it says something
(not for switches, not for a default of None, not where the help already names its default)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without the defaults that mislead or repeat: a switch's
    (store_true / store_false: its help says what it does), None (the help says what is done
    instead), and a help that already mentions its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction))
            or action.default is None
            or "default" in text
        ):
            return text
        return super()._get_help_string(action)

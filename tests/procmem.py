"""The start of every script that measures memory in a fresh Python process."""

PRELUDE = '''
import json, sys
import numpy as np
import fastsce

def status(key):
    """A /proc/self/status entry (VmRSS, VmHWM, RssAnon) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
'''

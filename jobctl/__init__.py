"""jobctl: the command-line client of jobd (SPEC §7).

``jobctl.cli`` parses the command line and calls ``jobd.client``; ``jobctl.render``
turns the answers into tables, progress bars and JSON.
"""

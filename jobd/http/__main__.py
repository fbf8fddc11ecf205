"""``python -m jobd.http``: the same as the ``jobd-http`` command."""

from jobd.http.gateway import main

main()

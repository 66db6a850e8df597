"""The exit status of every command: 0 all done, 1 some work failed (each failure named on
stderr, the rest done), 2 refused before any work (a user mistake, said in one line)."""

OK, FAILED, REFUSED = 0, 1, 2

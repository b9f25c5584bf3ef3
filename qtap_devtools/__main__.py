from qtap_devtools.cli import main

raise SystemExit(main())

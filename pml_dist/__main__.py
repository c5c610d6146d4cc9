from pml_dist.cli import main

raise SystemExit(main())

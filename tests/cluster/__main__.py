from tests.cluster.harness import main

raise SystemExit(main())

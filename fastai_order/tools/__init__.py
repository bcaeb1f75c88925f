"The project's own measuring commands: train-step and overhead benchmarks, optimize's savings, the zoo sweep"

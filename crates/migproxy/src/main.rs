#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    migproxy::cli::main()
}

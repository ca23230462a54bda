fn main() {
    print!("{}", agentguard::api::crds_yaml());
}
